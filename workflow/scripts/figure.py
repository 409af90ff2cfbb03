"""rules figure_<name>: the tables -> one figure, PNG + SVG (kvpack.report.figures.make_figure)."""

from pathlib import Path

from kvpack.pipeline.jobs import log_to_file

log_to_file(snakemake.log[0], "figure")

from kvpack.report.figures import make_figure
from kvpack.report.tables import read_tables

sm = snakemake
tables = read_tables(Path(sm.input.tables[0]).parent)
png, svg = make_figure(sm.params.name, tables, sm.output.png, sm.output.svg)
print(f"{sm.params.name}: {png}, {svg}")
