"""Raw records (docs/records.md): one JSON file per job, written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _clean(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_record(record: dict, path) -> Path:
    """Write to a temp file in the same folder, then rename: a killed job leaves no half record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(record), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path) -> dict:
    with open(path) as f:
        record = json.load(f)
    for key in ("kind", "provenance", "rows"):
        if key not in record:
            raise ValueError(f"{path}: not a kvpack record (missing {key!r})")
    return record
