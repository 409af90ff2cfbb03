"""The measurement study built on the kvpack library: what one benchmark, accuracy, decode, formats
or real-model job measures, and the raw record it returns (docs/records.md).

Modules here import the library (kvpack.ops, kvpack.reference, kvpack.torch_impl) and each other,
never kvpack.report or kvpack.pipeline (docs/architecture.md). Nothing is imported at package level:
``import kvpack.study.metrics`` loads metrics alone.
"""
