"""The headline tables of README.md and docs/results.md, from committed records: our fastest kernel against the paper, the
same op under torch.compile, and the copy ceiling measured in the same job; and (``--decode``) one
decode step: the fused INT8 kernel against the fastest fp16 SDPA backend and the int8 byte bound.

    python -m kvpack.report.headline                 # the newest records under reports/reference
    python -m kvpack.report.headline reports/reference/h100
    python -m kvpack.report.headline --decode reports/reference/h200
    python -m kvpack.report.headline --decode --brief reports/reference/h200   # the README's table
    python -m kvpack.report.headline --e2e            # a real model's decode step, every method
    python -m kvpack.report.headline --e2e --brief reports/reference/h100      # the README's table
    python -m kvpack.report.headline --paged reports/reference/h100   # the paged kernel vs the contiguous one
    python -m kvpack.report.headline --decode --paged reports/reference/h200  # the decode grid's paged rows, INT8 and INT4
    python -m kvpack.report.headline --int4 reports/reference/h100    # the INT4 kernel beside INT8 and fp16

Each table is preceded by a line naming the GPU, the commits and the dates of the records it comes from.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from ..study import records
from . import assemble

SHAPES = [(131072, 1024), (131072, 8192), (262144, 128)]
REFERENCE_ROOT = Path(__file__).resolve().parents[2] / "reports" / "reference"


def _provenances(reference_dir, stage: str) -> list[dict]:
    return [records.read_record(p)["provenance"] for p in sorted(Path(reference_dir).glob(f"{stage}/*.json"))]


def newest_reference_dir(root=REFERENCE_ROOT, stage: str = "benchmark") -> Path:
    """The folder under ``root`` whose ``stage`` records are the most recent (their latest provenance date)."""
    dated = [(max(p.get("date", "") for p in provs), d) for d in sorted(Path(root).iterdir())
             if d.is_dir() and (provs := _provenances(d, stage))]
    if not dated:
        raise FileNotFoundError(f"no {stage} records under {root}")
    return max(dated)[1]


def source_line(reference_dir, stage: str = "benchmark") -> str:
    """Which GPU, commits and dates the ``stage`` records of ``reference_dir`` come from."""
    provs = _provenances(reference_dir, stage)
    if not provs:
        raise FileNotFoundError(f"no {stage} records in {reference_dir}")
    gpus = sorted({p.get("gpu_name") or "?" for p in provs})
    commits = sorted({(p.get("git_commit") or "?")[:8] for p in provs})
    dates = sorted(p.get("date", "?")[:10] for p in provs)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}"
    return (f"Source: {', '.join(gpus)}; {len(provs)} {stage} records of commit {', '.join(commits)}, "
            f"{span} ({_shown(reference_dir)})")


def _shown(path) -> str:
    """``path`` relative to the checkout when it lies inside it."""
    p = Path(path).resolve()
    root = REFERENCE_ROOT.parents[1]
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()


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
    return _grid_order(pd.DataFrame(rows))


def _grid_order(out: pd.DataFrame) -> pd.DataFrame:
    """Decode grid rows in the tables' order: the grid's head dimension first, MHA before GQA, then batch and T."""
    if not len(out):
        return out
    key = out.assign(_d=out["D"] != out["D"].mode().iloc[0], _h=-out["Hq x Hkv"].str.split("x").str[1].astype(int))
    return out.loc[key.sort_values(["_d", "D", "_h", "B", "T"]).index].reset_index(drop=True)


def decode_paged_headline(reference_dir) -> pd.DataFrame:
    """The decode grid's paged rows (``decode.page_sizes``): per point, the contiguous INT8 and INT4
    kernels' times and each paged kernel's speed relative to its contiguous twin (1: as fast), and
    whether every paged result equalled the contiguous one bit for bit. Page sizes no row timed are left out."""
    from .tables import DECODE_PAGE_SIZES, DECODE_V2

    d = assemble.build_tables(reference_dirs=[reference_dir]).decode
    d = d[(d["record_format"] == DECODE_V2) & (d["status"] == "ok") & d["fused_median_ms"].notna()]
    rows = []
    for _, r in d.iterrows():
        row = {"T": int(r["T"]), "B": int(r["batch"]), "Hq x Hkv": f"{int(r['q_heads'])}x{int(r['kv_heads'])}",
               "D": int(r["head_dim"]), "int8_ms": float(r["fused_median_ms"])}
        same = []
        for fmt, base in (("paged", "fused"), ("int4_paged", "int4")):
            if fmt == "int4_paged":
                row["int4_ms"] = float(r.get("int4_median_ms", math.nan))
            for n in DECODE_PAGE_SIZES:
                ratio = r.get(f"{fmt}_p{n}_vs_{base}")
                if ratio is not None and not pd.isna(ratio):
                    row[f"{'int8' if fmt == 'paged' else 'int4'}_paged_p{n}_vs_contiguous"] = float(ratio)
                    same.append(bool(r.get(f"{fmt}_p{n}_equals_{base}")))
        row["bit_exact"] = ("yes" if all(same) else "no") if same else ""
        rows.append(row)
    return _grid_order(pd.DataFrame(rows).dropna(axis=1, how="all"))


def decode_brief(reference_dir) -> pd.DataFrame:
    """The README's short decode table: D = 128, the fastest fp16 SDPA backend against kvpack's fused
    INT8 kernel, one decode step, at B = 1 and 8 for T = 4096, 32768, 131072 (MHA and GQA)."""
    d = decode_headline(reference_dir)
    d = d[(d["D"] == 128) & d["B"].isin([1, 8])]
    out = d.rename(columns={"best_sdpa_ms": "fp16_sdpa_ms", "fused_int8_ms": "kvpack_int8_ms",
                            "fused_speedup": "int8_speedup"})
    return out[["T", "B", "Hq x Hkv", "fp16_sdpa_ms", "kvpack_int8_ms", "int8_speedup"]].reset_index(drop=True)


E2E_POINTS = [(32768, 8), (4096, 1)]
E2E_METHODS = ["kvpack_token_graph", "kvpack_channel_graph", "fp16_graph", "static_sdpa_compiled", "dynamic_sdpa",
               "quantized_hqq_int8", "quantized_fp8"]


def e2e_headline(reference_dir) -> pd.DataFrame:
    """The end-to-end table: ms per decode step of each method at the issue's points, tokens/s, the
    ratio to fp16 in the same captured loop and to the step's fp16 byte bound, and then the largest
    batch at T = 32768 of each capacity method with its tokens/s."""
    from .tables import E2E_LABELS

    e = assemble.build_tables(reference_dirs=[reference_dir]).e2e
    ok = e[e["status"] == "ok"]
    rows = []
    for T, b in E2E_POINTS:
        pt = ok[(ok["T"] == T) & (ok["batch"] == b) & ~ok["capacity"].astype(bool)]
        for m in E2E_METHODS:
            r = pt[pt["method"] == m]
            if len(r):
                r = r.iloc[0]
                rows.append({"T": T, "batch": b, "method": E2E_LABELS[m], "ms_per_step": float(r["step_median_ms"]),
                             "tokens_per_s": float(r["tokens_per_s"]), "vs_fp16_graph_speedup": float(r["vs_fp16_graph"]),
                             "vs_fp16_bound_speedup": float(r["vs_fp16_bound"]),
                             "fraction_of_bound": float(r["fraction_of_bound"])})
    cap = ok[ok["capacity"].astype(bool)]
    for _, r in cap.sort_values("batch", ascending=False).iterrows():
        rows.append({"T": int(r["T"]), "batch": int(r["batch"]), "method": E2E_LABELS[r["method"]] + ", largest batch",
                     "ms_per_step": float(r["step_median_ms"]), "tokens_per_s": float(r["tokens_per_s"]),
                     "vs_fp16_graph_speedup": math.nan, "vs_fp16_bound_speedup": float(r["vs_fp16_bound"]),
                     "fraction_of_bound": float(r["fraction_of_bound"])})
    return pd.DataFrame(rows)


def e2e_brief(reference_dir) -> pd.DataFrame:
    """The README's end-to-end table: per (T, batch), ms per decode step of kvpack's INT8 cache (token
    scales, graph-captured), the fp16 cache in the same captured loop, the step's fp16 byte bound, the
    fastest transformers path (DynamicCache eager, StaticCache compiled) and the fastest QuantizedCache,
    all from one job; the INT8 step's speedup over the fp16 one."""
    e = assemble.build_tables(reference_dirs=[reference_dir]).e2e
    ok = e[(e["status"] == "ok") & ~e["capacity"].astype(bool)]
    rows = []
    for (T, b), pt in ok.groupby(["T", "batch"]):
        ms = pt.groupby("method")["step_median_ms"].min()
        if "kvpack_token_graph" not in ms or "fp16_graph" not in ms:
            continue
        hf = ms[ms.index.isin(["dynamic_sdpa", "static_sdpa_compiled"])]
        quant = ms[ms.index.str.startswith("quantized")]
        k = pt[pt["method"] == "kvpack_token_graph"].iloc[0]
        rows.append({"T": int(T), "batch": int(b), "kvpack_int8_ms": float(ms["kvpack_token_graph"]),
                     "fp16_graph_ms": float(ms["fp16_graph"]), "fp16_byte_bound_ms": float(k["fp16_byte_bound_ms"]),
                     "transformers_best_ms": float(hf.min()) if len(hf) else math.nan,
                     "quantized_cache_ms": float(quant.min()) if len(quant) else math.nan,
                     "int8_vs_fp16_speedup": float(ms["fp16_graph"] / ms["kvpack_token_graph"])})
    return pd.DataFrame(rows)


def e2e_capacity(reference_dir) -> pd.DataFrame:
    """The largest batch each graph-captured cache ran at its context T, with its step and tokens/s."""
    from .tables import E2E_LABELS

    e = assemble.build_tables(reference_dirs=[reference_dir]).e2e
    cap = e[(e["status"] == "ok") & e["capacity"].astype(bool)].sort_values(["T", "batch"], ascending=[True, False])
    return pd.DataFrame([{"T": int(r["T"]), "cache": E2E_LABELS[r["method"]].split(",")[0],
                          "largest_batch": int(r["batch"]), "ms_per_step": float(r["step_median_ms"]),
                          "tokens_per_s": float(r["tokens_per_s"])} for _, r in cap.iterrows()])


def paged_headline(reference_dir) -> pd.DataFrame:
    """The paged decode kernel beside the contiguous one (``paged/decode_paged.json``, written by
    tools/bench_decode.py --page-sizes): per point, the fastest fp16 SDPA, the contiguous fused INT8
    kernel, the paged kernel at each page size, its speed relative to the contiguous kernel (1: as
    fast) and whether it gave the contiguous kernel's result bit for bit."""
    import json

    path = Path(reference_dir) / "paged" / "decode_paged.json"
    rec = json.loads(path.read_text())
    rows = []
    for r in rec["rows"]:
        if r.get("status") != "ok":
            continue
        sizes = sorted(int(k[len("paged_p"):-len("_median_ms")]) for k in r
                       if k.startswith("paged_p") and k.endswith("_median_ms"))
        row = {"T": int(r["T"]), "B": int(r["batch"]), "Hq x Hkv": f"{int(r['q_heads'])}x{int(r['kv_heads'])}",
               "best_sdpa_ms": float(r["sdpa_best_median_ms"]), "fused_int8_ms": float(r["fused_median_ms"])}
        for n in sizes:
            row[f"paged_p{n}_ms"] = float(r[f"paged_p{n}_median_ms"])
        ratios = [float(r[f"paged_p{n}_vs_fused"]) for n in sizes]
        row["paged_vs_fused_worst_speedup"] = min(ratios)
        row["paged_vs_fused_best_speedup"] = max(ratios)
        row["bit_exact"] = "yes" if all(r.get(f"paged_p{n}_equals_fused") for n in sizes) else "no"
        rows.append(row)
    return pd.DataFrame(rows)


def int4_headline(reference_dir) -> pd.DataFrame:
    """The INT4 decode kernel beside INT8 and fp16 (``int4/decode_int4.json``, written by
    tools/bench_decode.py): per point, the fastest fp16 SDPA, the fused INT8 and INT4 kernels, INT4's
    speed over each, and the fraction of the int4 byte bound (packed values and scales at the copy
    rate of the same job) it reaches."""
    import json

    rec = json.loads((Path(reference_dir) / "int4" / "decode_int4.json").read_text())
    return pd.DataFrame([{"T": int(r["T"]), "B": int(r["batch"]), "Hq x Hkv": f"{int(r['q_heads'])}x{int(r['kv_heads'])}",
                          "D": int(r["head_dim"]), "best_sdpa_ms": float(r["sdpa_best_median_ms"]),
                          "int8_ms": float(r["fused_median_ms"]), "int4_ms": float(r["int4_median_ms"]),
                          "int4_vs_sdpa_speedup": float(r["int4_speedup_vs_sdpa"]),
                          "int4_vs_int8_speedup": float(r["int4_vs_fused"]),
                          "fraction_of_int4_bound": float(r["int4_fraction_of_int4_bound"])}
                         for r in rec["rows"] if r.get("status") == "ok" and r.get("int4_median_ms")])


PEER_METHODS = ("kvpack_int8", "kvpack_int8_paged", "kvpack_int4_paged", "fi_fa2_fp16", "fi_fa2tc_fp16", "fi_xqa_fp16", "fi_fa2_fp8",
                "fi_fa2tc_fp8", "fi_xqa_fp8")


def peers_headline(reference_dir, page_size: int = 16) -> pd.DataFrame:
    """kvpack's paged INT8 (and INT4) decode beside FlashInfer's paged decode (``peers/paged_peers_p{P}.json``,
    written by tools/bench_paged_peers.py): per point, the fastest fp16 SDPA and each method's speed
    over it in the same job; ``paged_vs_contiguous`` is kvpack's paged kernel against its contiguous
    one (1: as fast)."""
    import json

    rec = json.loads((Path(reference_dir) / "peers" / f"paged_peers_p{page_size}.json").read_text())
    rows = []
    for r in rec["rows"]:
        if "sdpa_best" not in r:
            continue
        row = {"B": int(r["batch"]), "Hq x Hkv": f"{int(r['q_heads'])}x{int(r['kv_heads'])}", "T": int(r["T"]),
               "best_sdpa_ms": float(r[f"{r['sdpa_best']}_median_ms"])}
        for m in PEER_METHODS:
            row[f"{m}_speedup"] = float(r.get(f"{m}_speedup_vs_sdpa", math.nan))
        row["paged_vs_contiguous_speedup"] = float(r["kvpack_int8_median_ms"] / r["kvpack_int8_paged_median_ms"])
        rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")  # a method the record never timed (INT4: since 88dcf28)


def record_source_line(reference_dir, rel: str) -> str:
    """The line naming a single record's GPU, commit and date (``rel``: its path in the folder)."""
    import json

    p = json.loads((Path(reference_dir) / rel).read_text())["provenance"]
    return (f"Source: {p.get('gpu_name')}; {rel} of commit {str(p.get('git_commit'))[:8]}, "
            f"{str(p.get('date'))[:10]} ({_shown(reference_dir)})")


PERPLEXITY_RECORD = REFERENCE_ROOT.parents[1] / "data" / "models" / "stdlib-llama" / "perplexity.json"


def perplexity_table(path=PERPLEXITY_RECORD) -> pd.DataFrame:
    """The perplexity of the trained stdlib model through each cache (kvpack.study.perplexity)."""
    import json

    rec = json.loads(Path(path).read_text())
    # bytes per cached value, fp32 scales included (head_dim 64; per-channel scales ~0 over many tokens;
    # int4_channel: keys per channel, values per group of 32); exact: the fp32 cache the model runs in
    bpe = {"exact": 4.0, "int8_token": 1 + 4 / 64, "int8_channel": 1.0, "int4_token_g32": 0.5 + 4 / 32,
           "int4_channel": (0.5 + 0.5 + 4 / 32) / 2}
    return pd.DataFrame([{"cache": r["method"], "bytes_per_value": bpe.get(r["method"], math.nan),
                          "perplexity": float(r["perplexity"]), "ratio_to_exact": float(r["vs_exact"])}
                         for r in rec["rows"]])


def paged_source_line(reference_dir) -> str:
    """The line naming the paged record's GPU, commit and date."""
    return record_source_line(reference_dir, "paged/decode_paged.json")


def to_markdown(df: pd.DataFrame) -> str:
    def cell(col, v):
        if not isinstance(v, float):
            return str(v)
        if math.isnan(v):
            return ""
        if col.startswith("fraction"):
            return f"{v:.1%}"
        if col.endswith("_speedup"):
            return f"{v:.2f}x"
        if math.isnan(v):
            return ""
        return f"{v:,.0f}" if col.endswith(("_gbps", "_per_s")) else f"{v:.3f}"
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference_dir", nargs="?", default=None,
                    help="default: the folder under reports/reference with the newest records")
    ap.add_argument("--decode", action="store_true", help="the decode-step table (records of kind 'decode')")
    ap.add_argument("--e2e", action="store_true", help="the end-to-end table (records of kind 'e2e')")
    ap.add_argument("--perplexity", action="store_true", help="the trained stdlib model's perplexity per cache")
    ap.add_argument("--paged", action="store_true", help="the paged decode kernel beside the contiguous one "
                    "(with --decode: the decode grid's paged rows, INT8 and INT4)")
    ap.add_argument("--int4", action="store_true", help="the INT4 decode kernel beside INT8 and fp16 SDPA")
    ap.add_argument("--peers", action="store_true", help="kvpack's paged decode beside FlashInfer's (page size 16)")
    ap.add_argument("--brief", action="store_true", help="with --decode or --e2e: the README's short table")
    args = ap.parse_args(argv)
    stage = "decode" if args.decode else "e2e" if args.e2e else "benchmark"
    if args.perplexity:
        print(to_markdown(perplexity_table()))
        return 0
    if args.paged and args.decode:
        ref = args.reference_dir or newest_reference_dir(stage="decode")
        print(source_line(ref, "decode") + "\n")
        print(to_markdown(decode_paged_headline(ref)))
        return 0
    if args.paged:
        ref = Path(args.reference_dir or "reports/reference/h100")
        print(paged_source_line(ref) + "\n")
        print(to_markdown(paged_headline(ref)))
        return 0
    if args.int4:
        ref = Path(args.reference_dir or "reports/reference/h100")
        print(record_source_line(ref, "int4/decode_int4.json") + "\n")
        print(to_markdown(int4_headline(ref)))
        return 0
    if args.peers:
        ref = Path(args.reference_dir or "reports/reference/h100")
        print(record_source_line(ref, "peers/paged_peers_p16.json") + "\n")
        print(to_markdown(peers_headline(ref)))
        return 0
    ref = args.reference_dir or newest_reference_dir(stage=stage)
    print(source_line(ref, stage) + "\n")
    if stage == "e2e" and args.brief:
        print(to_markdown(e2e_brief(ref)) + "\n\n" + to_markdown(e2e_capacity(ref)))
        return 0
    decode = decode_brief if args.brief else decode_headline
    table = {"decode": decode, "e2e": e2e_headline, "benchmark": headline}[stage](ref)
    print(to_markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
