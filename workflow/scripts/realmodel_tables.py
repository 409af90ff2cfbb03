"""rule realmodel_tables: the real-model record -> realmodel.csv, realmodel_stats.csv, realmodel_attention.csv."""


from kvpack.jobs import log_to_file

log_to_file(snakemake.log[0], "realmodel_tables")

from pathlib import Path  # noqa: E402

from kvpack import realmodel  # noqa: E402

paths = realmodel.write_realmodel_tables(snakemake.input.record, Path(snakemake.output["realmodel"]).parent)
for name, p in paths.items():
    if str(p) != str(snakemake.output[name]):
        raise RuntimeError(f"{name}: wrote {p}, the rule expects {snakemake.output[name]}")
    print(f"{name}: {p}")
