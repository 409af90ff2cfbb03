"""The README's headline table, from committed records: our fastest kernel against the paper, the
same op under torch.compile, and the copy ceiling measured in the same job.

    python -m kvpack.report.headline reports/reference/h100
"""

from __future__ import annotations

import argparse

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


def to_markdown(df: pd.DataFrame) -> str:
    def cell(col, v):
        if not isinstance(v, float):
            return str(v)
        if col.startswith("fraction"):
            return f"{v:.1%}"
        return f"{v:,.0f}" if col.endswith("_gbps") else f"{v:.3f}"
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference_dir", nargs="?", default="reports/reference/h100")
    args = ap.parse_args(argv)
    print(to_markdown(headline(args.reference_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
