"""rules figure_<name>: the tables -> one figure, PNG + SVG (kvpack.figures.make_figure)."""

from pathlib import Path

from kvpack.jobs import log_to_file

log_to_file(snakemake.log[0], "figure")

from kvpack.figures import make_figure  # noqa: E402
from kvpack.tables import read_tables  # noqa: E402

sm = snakemake
tables = read_tables(Path(sm.input.tables[0]).parent)
png, svg = make_figure(sm.params.name, tables, sm.output.png, sm.output.svg)
print(f"{sm.params.name}: {png}, {svg}")
