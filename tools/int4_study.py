"""Which INT4 grouping (issue 17): symmetric or asymmetric, group size, per-token groups or per-channel
keys, against INT8 and fp8, on the format study's data (kvpack.study.formats: K and V of each
distribution, n queries of the same family, everything scored in float64 against the unquantized
cache). Prints, per format and role, the geometric mean over the distributions and head dimensions
of the attention output's relative error and the top-1 agreement (the fraction of queries whose
most-attended token is unchanged), with the bytes per element; --json writes the rows.

    python tools/int4_study.py [--Ds 64 128] [--T 2048] [--distributions uniform gaussian student_t outlier_keys]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpack.study import formats

COMPARE = ("int8_token", "int8_channel", "fp8_e4m3") + formats.INT4_FORMATS + (
    "int4_token_g32_hadamard", "int4_token_g32_smooth")  # key transforms (formats' doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--Ds", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--distributions", nargs="+", default=list(formats.DEFAULT_DISTRIBUTIONS))
    ap.add_argument("--n-queries", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    df = formats.compare_formats(args.distributions, COMPARE, args.Ds, args.T, ("float16",), args.seed,
                                 n_queries=args.n_queries, topk=1)
    df = df[df["role"].isin(["key", "value"])]
    g = df.groupby(["role", "format"]).agg(
        bytes_per_element=("bytes_per_element", "mean"),
        output_rel_error=("output_rel_error", formats._geomean),
        top1_agreement_min=("topk_agreement", "min"),
        top1_agreement_mean=("topk_agreement", "mean"))
    out = df[["distribution", "D", "role", "format", "bytes_per_element", "output_rel_error", "topk_agreement"]]
    worst = out.pivot_table(index=["role", "format"], columns="distribution", values="output_rel_error", aggfunc="max")
    for role in ("key", "value"):
        print(f"\n{role}s quantized (the other exact): geometric mean over {args.distributions} x D {args.Ds}")
        print(g.loc[role].sort_values("output_rel_error").to_string(float_format=lambda v: f"{v:.4g}"))
        print(f"  worst output error per distribution ({role}s):")
        print(worst.loc[role].to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"\n({len(df)} rows, {time.perf_counter() - t0:.0f} s; T = {args.T}, {args.n_queries} queries, fp16 K/V, seed {args.seed})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": out.to_dict("records")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
