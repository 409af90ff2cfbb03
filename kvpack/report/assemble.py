"""Every table of one report at once: the tables of :mod:`kvpack.report.tables` and the claims
table of :mod:`kvpack.report.claims`, which reads them. This module sits above both, so that
neither of them imports the other's caller (tables -> claims -> assemble, one way).

    tables = build_tables(benchmark_paths, accuracy_paths, reference_dirs, "reports/paper", grid)
    write_tables(benchmark_paths, accuracy_paths, reference_dirs, "reports/paper", grid, "results/tables")
    tables = read_tables("results/tables")        # kvpack.report.tables.read_tables
"""

from __future__ import annotations

from pathlib import Path

from . import claims
from .tables import (
    PAPER_DIR,
    Tables,
    _normalise_grid,
    accuracy_table,
    collect_records,
    decode_accuracy_table,
    decode_api_table,
    decode_append_table,
    decode_int4_table,
    decode_peers_table,
    decode_table,
    e2e_table,
    memory_table,
    paper_table,
    paper_workloads,
    performance_table,
    provenance_table,
    speedup_table,
    workloads_table,
)


def build_tables(benchmark_paths=(), accuracy_paths=(), reference_dirs=(), paper_dir=PAPER_DIR, grid=None,
                 claims_path=None, decode_paths=(), e2e_paths=()) -> Tables:
    """Every table, from raw record paths, reference directories, the paper's folder and the config grid."""
    records = collect_records(benchmark_paths, accuracy_paths, reference_dirs, decode_paths, e2e_paths)
    paper = paper_table(paper_dir)
    perf = performance_table(records)
    acc = accuracy_table(records, paper_dir)
    run_grid = _normalise_grid(grid) if grid else [
        {"name": r["workload"].get("name"), "T": r["workload"]["T"], "D": r["workload"]["D"],
         "dtypes": [r["workload"].get("dtype", "float32")]} for r in records if r["kind"] in ("benchmark", "accuracy")]
    t = Tables(
        performance=perf,
        accuracy=acc,
        memory=memory_table(paper_workloads(paper_dir) + run_grid, paper_dir),
        workloads=workloads_table(run_grid, paper_dir),
        paper=paper,
        speedups=speedup_table(perf, paper),
        provenance=provenance_table(records),
        paper_l2=claims.paper_l2_check(paper_dir),
        decode=decode_table(records),
        decode_append=decode_append_table(records),
        decode_accuracy=decode_accuracy_table(records),
        e2e=e2e_table(records),
        decode_int4=decode_int4_table(records),
        decode_api=decode_api_table(records),
        decode_peers=decode_peers_table(records),
    )
    t.claims = claims.claims_table(t, claims_path or Path(paper_dir) / "claims.yaml")
    return t


def write_tables(benchmark_paths, accuracy_paths, reference_dirs, paper_dir, grid, outdir, claims_path=None,
                 decode_paths=(), e2e_paths=()) -> dict:
    """Build every table and write ``<outdir>/<name>.csv`` for each of TABLE_NAMES. Returns {name: path}."""
    t = build_tables(benchmark_paths, accuracy_paths, reference_dirs, paper_dir, grid, claims_path, decode_paths,
                     e2e_paths)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, df in t.as_dict().items():
        paths[name] = outdir / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    return paths


__all__ = ["build_tables", "write_tables"]
