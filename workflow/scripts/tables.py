"""rule tables: raw records (this run + reference dirs) -> results/tables/*.csv, the claims' verdicts
included (kvpack.report.assemble.write_tables)."""

import os

from kvpack.pipeline.jobs import log_to_file

log_to_file(snakemake.log[0], "tables")

from kvpack.report.assemble import write_tables

sm = snakemake
paths = write_tables(
    benchmark_paths=list(sm.input.benchmark),
    accuracy_paths=list(sm.input.accuracy),
    decode_paths=list(sm.input.decode),
    e2e_paths=list(sm.input.e2e),
    reference_dirs=list(sm.params.reference_dirs),
    paper_dir=sm.params.paper_dir,
    grid=list(sm.params.grid),
    outdir=sm.params.outdir,
)
written = {os.path.normpath(str(p)) for p in paths.values()}
missing = [str(p) for p in sm.output if os.path.normpath(str(p)) not in written]
if missing:
    raise RuntimeError(f"tables not written: {missing} (kvpack.report.tables.TABLE_NAMES and rule tables disagree)")
for name, p in paths.items():
    print(f"{name}: {p}")
