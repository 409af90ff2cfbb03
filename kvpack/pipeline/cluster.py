"""Running the workflow on a SLURM cluster (docs/cluster.md, config/profiles/slurm/).

Without snakemake-executor-plugin-slurm, ``snakemake --profile config/profiles/slurm`` stops in
argument parsing with "argument --executor/-e: invalid choice: 'slurm'", before any of the workflow
runs, and says nothing about what to install. ``python -m kvpack.pipeline.cluster`` says it.
"""

from __future__ import annotations

import importlib.util
import sys

PLUGIN_MODULE = "snakemake_executor_plugin_slurm"
PLUGIN_PACKAGE = "snakemake-executor-plugin-slurm"
INSTALL_HINT = 'pip install -e ".[cluster]"'


def check_executor_plugin() -> str | None:
    """None when Snakemake can submit to SLURM from this Python, else what is missing and how to install it."""
    if importlib.util.find_spec(PLUGIN_MODULE) is not None:
        return None
    return (
        f"Snakemake cannot submit to SLURM from this Python ({sys.executable}): the executor plugin "
        f"{PLUGIN_PACKAGE} is not installed, so `snakemake --profile config/profiles/slurm` fails with "
        f"\"argument --executor/-e: invalid choice: 'slurm'\". Install it with `{INSTALL_HINT}` "
        f"(or `pip install {PLUGIN_PACKAGE}`) in the environment that runs snakemake."
    )


def main() -> int:
    message = check_executor_plugin()
    if message:
        print(message, file=sys.stderr)
        return 1
    print(f"{PLUGIN_PACKAGE} is installed: `snakemake --profile config/profiles/slurm` can submit jobs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
