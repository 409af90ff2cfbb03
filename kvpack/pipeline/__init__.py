"""The workflow's plumbing: the validated config, a run's provenance, what every job does around its
kvpack call, the runner for a machine without Snakemake, and the SLURM check.

Modules here may import the library and the study (the runner drives the measurement jobs); nothing
in kvpack imports them: the workflow's scripts, the tools and the tests do (docs/architecture.md).
"""
