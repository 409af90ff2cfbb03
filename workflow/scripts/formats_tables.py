"""rule formats_tables: the format study's records -> formats.csv, formats_summary.csv, formats_winners.csv."""


from kvpack.pipeline.jobs import log_to_file

log_to_file(snakemake.log[0], "formats_tables")

from pathlib import Path

from kvpack.study import formats

outdir = Path(snakemake.output["formats"]).parent
paths = formats.write_formats_tables(snakemake.input.records, outdir, float(snakemake.params.bytes_budget))
for name, p in paths.items():
    if str(p) != str(snakemake.output[name]):
        raise RuntimeError(f"{name}: wrote {p}, the rule expects {snakemake.output[name]}")
    print(f"{name}: {p}")
