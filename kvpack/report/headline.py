"""The README's headline tables, from committed records: our fastest kernel against the paper, the
same op under torch.compile, and the copy ceiling measured in the same job; and (``--decode``) one
decode step: the fused INT8 kernel against the fastest fp16 SDPA backend and the int8 byte bound.

    python -m kvpack.report.headline reports/reference/h100
    python -m kvpack.report.headline --decode reports/reference/h200
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from . import assemble

SHAPES = [(131072, 1024), (131072, 8192), (262144, 128)]


def headline(reference_dir, shapes=SHAPES) -> pd.DataFrame:
    t = assemble.build_tables(reference_dirs=[reference_dir])
    perf = t.performance[(t.performance["status"] == "ok") & (t.performance["dtype"] == "float32")
                         & (t.performance["granularity"] == "channel")]
    paper = t.paper
    rows = []
    for T, D in shapes:
        p = perf[(perf["T"] == T) & (perf["D"] == D)]
        if p.empty:
            continue
        for op in ("quantize", "dequantize"):
            def get(impl, col="median_ms", p=p, op=op):  # this shape's rows and this op, bound now
                r = p[(p["impl"] == impl) & (p["op"] == op)]
                return float(r[col].iloc[0]) if len(r) else float("nan")

            pp = paper[(paper["T"] == T) & (paper["D"] == D) & (paper["impl"] == "vectorized") & (paper["op"] == op)]
            paper_ms = float(pp["time_ms"].iloc[0]) if len(pp) else float("nan")
            nbytes = float(p[(p["impl"] == "fast") & (p["op"] == op)]["moved_bytes"].iloc[0])
            ceiling = float(p["copy_ceiling_gbps"].dropna().iloc[0])
            rows.append({
                "shape": f"{T}x{D}", "op": op,
                "fast_ms": get("fast"), "fast_gbps": nbytes / get("fast") / 1e6,
                "fraction_of_copy": nbytes / get("fast") / 1e6 / ceiling,
                "paper_vectorized_ms": paper_ms, "paper_gbps": nbytes / paper_ms / 1e6,
                "torch_compile_ms": get("torch_compile"), "torch_compile_gbps": nbytes / get("torch_compile") / 1e6,
                "copy_ceiling_gbps": ceiling,
            })
    return pd.DataFrame(rows)


def decode_headline(reference_dir) -> pd.DataFrame:
    """One row per decode grid point of ``reference_dir`` that has a fused-kernel time (records of kind 'decode')."""
    from .tables import DECODE_V2

    d = assemble.build_tables(reference_dirs=[reference_dir]).decode
    d = d[(d["record_format"] == DECODE_V2) & (d["status"] == "ok") & d["fused_median_ms"].notna()]
    rows = []
    for _, r in d.iterrows():
        rows.append({
            "T": int(r["T"]), "B": int(r["batch"]), "Hq x Hkv": f"{int(r['q_heads'])}x{int(r['kv_heads'])}",
            "D": int(r["head_dim"]), "best_sdpa": r["sdpa_best"], "best_sdpa_ms": float(r["sdpa_best_median_ms"]),
            "dequant_sdpa_ms": float(r["dequant_sdpa_median_ms"]), "fused_int8_ms": float(r["fused_median_ms"]),
            "fused_speedup": float(r["fused_speedup_vs_sdpa"]),
            "fraction_of_int8_bound": float(r["fused_fraction_of_int8_bound"]), "copy_gbps": float(r["copy_gbps"]),
        })
    out = pd.DataFrame(rows)
    if len(out):  # the grid's head dimension first, MHA before GQA, then batch and T
        key = out.assign(_d=out["D"] != out["D"].mode().iloc[0], _h=-out["Hq x Hkv"].str.split("x").str[1].astype(int))
        out = out.loc[key.sort_values(["_d", "D", "_h", "B", "T"]).index].reset_index(drop=True)
    return out


def to_markdown(df: pd.DataFrame) -> str:
    def cell(col, v):
        if not isinstance(v, float):
            return str(v)
        if col.startswith("fraction"):
            return f"{v:.1%}"
        if col.endswith("_speedup"):
            return f"{v:.2f}x"
        if math.isnan(v):
            return ""
        return f"{v:,.0f}" if col.endswith("_gbps") else f"{v:.3f}"
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference_dir", nargs="?", default=None, help="default: reports/reference/h100 (h200 with --decode)")
    ap.add_argument("--decode", action="store_true", help="the decode-step table (records of kind 'decode')")
    args = ap.parse_args(argv)
    if args.decode:
        print(to_markdown(decode_headline(args.reference_dir or "reports/reference/h200")))
    else:
        print(to_markdown(headline(args.reference_dir or "reports/reference/h100")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
