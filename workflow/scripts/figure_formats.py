"""rules figure_formats, figure_realmodel: one table -> one figure, PNG + SVG (kvpack.report.figures_formats.FIGURES)."""


from kvpack.pipeline.jobs import log_to_file

log_to_file(snakemake.log[0], "figure_formats")

import pandas as pd

from kvpack.report.figures_formats import FIGURES

try:
    table = pd.read_csv(snakemake.input.table)
except pd.errors.EmptyDataError:
    table = pd.DataFrame()
png, svg = FIGURES[snakemake.params.name](table, snakemake.output.png, snakemake.output.svg)
print(f"{snakemake.params.name}: {png}, {svg}")
