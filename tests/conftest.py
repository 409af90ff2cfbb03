"""Shared test setup: the gpu marker's skip, and the hypothesis profiles.

Property tests (hypothesis) are deterministic by default: the "ci" profile derandomizes them (the
examples are a function of the test alone), keeps no example database and has no deadline, so a
run that passed passes again and CI fails only on a change. To search with fresh random examples
instead, opt in with the "fresh" profile (also in docs/usage.md, "The tests"):

    KVPACK_HYPOTHESIS=fresh python -m pytest tests/test_reference.py tests/test_cpu_ops.py
    python -m pytest --hypothesis-profile=fresh ...     # the same, through hypothesis' own option

A failure in the fresh mode prints the falsifying example and a ``@reproduce_failure`` blob; add the
example to the test with ``@example(...)`` so that the deterministic runs keep checking it.
"""

import os

import pytest
import torch
from hypothesis import settings

HAS_CUDA = torch.cuda.is_available()

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("fresh", derandomize=False, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("KVPACK_HYPOTHESIS", "ci"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
