"""``python -m kvpack.build``: build and load the extension, print (and with --out write) what was
built as JSON, with the variants that run here.

The command line lives here, not in kvpack/build/__init__.py, because listing the variants asks
kvpack.ops, and kvpack.ops imports kvpack.build to load the extension: the builder itself imports
nothing else of kvpack, so the two never import each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvpack import build, ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=build.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write what was built as JSON here")
    ap.add_argument("--cpu-only", action="store_true", help="build the CPU half only")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    info = build.load(cpu_only=args.cpu_only, verbose=args.verbose)
    info["variants"] = list(ops.available_variants("cuda" if info["cuda"] else "cpu"))
    if not info["cuda"]:
        print(f"kvpack: built the CPU half only; GPU variants skipped: {info['cuda_skipped_reason']}", file=sys.stderr)
    text = json.dumps(info, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
