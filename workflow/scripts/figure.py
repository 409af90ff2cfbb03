"""rules figure_<name>: the tables -> one figure, PNG + SVG (kvpack.figures.make_figure)."""

import os
import sys
from pathlib import Path

logfile = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115 (the log stays open for the whole job)
os.dup2(logfile.fileno(), 1)
os.dup2(logfile.fileno(), 2)
sys.stdout = sys.stderr = logfile

from kvpack.figures import make_figure  # noqa: E402
from kvpack.tables import read_tables  # noqa: E402

sm = snakemake
tables = read_tables(Path(sm.input.tables[0]).parent)
png, svg = make_figure(sm.params.name, tables, sm.output.png, sm.output.svg)
print(f"{sm.params.name}: {png}, {svg}")
