"""The report over the study's records: tables, the paper's claims and their verdicts, figures, the
README's headline table.

Modules here read the study's record formats and metrics (kvpack.study); nothing in the library or
the study imports them (docs/architecture.md). Nothing is imported at package level.
"""
