"""rule realmodel_tables: the real-model record -> realmodel.csv, realmodel_stats.csv, realmodel_attention.csv."""


from kvpack.pipeline.jobs import log_to_file

log_to_file(snakemake.log[0], "realmodel_tables")

from pathlib import Path

from kvpack.study import realmodel

paths = realmodel.write_realmodel_tables(snakemake.input.record, Path(snakemake.output["realmodel"]).parent)
for name, p in paths.items():
    if str(p) != str(snakemake.output[name]):
        raise RuntimeError(f"{name}: wrote {p}, the rule expects {snakemake.output[name]}")
    print(f"{name}: {p}")
