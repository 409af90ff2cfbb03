"""The report's figures: one function per figure, each reading :class:`kvpack.report.tables.Tables` and saving
a PNG and an SVG. The paper's own numbers sit beside ours wherever they exist (marker 'X', dashed,
legend 'paper (their GPU)'). A figure that needs GPU data and finds none draws a clear
'no GPU measurements' text in its panel instead of failing.

    from kvpack.report import figures, tables
    figures.make_figure("time", tables.read_tables("results/tables"), "time.png", "time.svg")
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from ..study import metrics
from .tables import (
    CPU_BASELINES,
    GPU_IMPLS,
    PAPER_SOURCE,
    PAPER_VARIANTS,
    PEERS,
    QUANT_DEQUANT,
    THIS_RUN,
    Tables,
    paper_accuracy_table,
    quant_dequant_table,
    source_device_label,
)

IMPLS = ("cpu_serial", "cpu_torch", "naive", "tiled", "coarsened", "vectorized", "fast", *PEERS)
IMPL_COLORS = dict(zip(IMPLS, sns.color_palette("tab10", len(IMPLS))))
PAPER_MARKER = "X"
SOURCE_MARKERS = ("o", "s", "D", "^", "v", "P", "*")
NOTE_BOX = {"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "grey"}
NO_GPU = ("no GPU measurements\n(no CUDA GPU in this run, and no reference GPU run)")


def _theme():
    sns.set_theme(context="notebook", style="whitegrid")


def _save(fig, png, svg=None) -> tuple[Path, Path]:
    png = Path(png)
    svg = Path(svg) if svg else png.with_suffix(".svg")
    for p in (png, svg):
        p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(svg, bbox_inches="tight")
    plt.close(fig)
    return png, svg


def _message(ax, text: str, y: float = 0.5) -> None:
    ax.text(0.5, y, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
            bbox=NOTE_BOX)


def _paper_setting(df: pd.DataFrame) -> pd.DataFrame:
    if df is None or not len(df):
        return pd.DataFrame(columns=getattr(df, "columns", []))
    m = pd.Series(True, index=df.index)
    if "dtype" in df:
        m &= df["dtype"] == "float32"
    if "granularity" in df:
        m &= df["granularity"] == "channel"
    if "status" in df:
        m &= df["status"] == "ok"
    return df[m]


def _src_label(source: str, slug: str) -> str:
    return source_device_label(source, slug)


def _source_markers(*frames) -> dict[str, str]:
    keys = []
    for f in frames:
        if f is not None and len(f):
            keys += [_src_label(s, d) for s, d in zip(f["source"], f["device_slug"])]
    keys = sorted(set(keys), key=lambda k: (not k.startswith(THIS_RUN), k))
    return {k: SOURCE_MARKERS[i % len(SOURCE_MARKERS)] for i, k in enumerate(keys)}


def _plot_paper(ax, df, x, y, ls="--"):
    for impl, g in df.groupby("impl", sort=False):
        g = g.sort_values(x)
        ax.plot(g[x], g[y], marker=PAPER_MARKER, color=IMPL_COLORS.get(impl, "black"), ls=ls, lw=0.9, ms=7,
                alpha=0.75, markeredgecolor="black", markeredgewidth=0.4)


def _has_gpu(t: Tables) -> bool:
    p = t.performance
    return p is not None and len(p) and bool(((p["device"] == "cuda") & (p["status"] == "ok")).any())


def _gpu_sources(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The (source, device) pairs with GPU rows, this run first: one panel column each."""
    if df is None or not len(df):
        return []
    g = df[df["device"] == "cuda"] if "device" in df else df
    keys = sorted({(s, d) for s, d in zip(g["source"], g["device_slug"])}, key=lambda k: (k[0] != THIS_RUN, k))
    return keys


def _commit(t: Tables, source: str, slug: str) -> str:
    """The commit(s) that made a source's records, short, for a panel's title."""
    p = t.provenance
    if p is None or not len(p) or "git_commit" not in p:
        return "?"
    row = p[(p["source"] == source) & (p["device_slug"] == slug)]
    commits = sorted({c[:8] for v in row["git_commit"].dropna().astype(str) for c in v.split(", ") if c})
    return ", ".join(commits[:2]) + (" ..." if len(commits) > 2 else "") if commits else "?"


def _panel_title(t: Tables, source: str, slug: str, what: str = "") -> str:
    """'<what>' over '<source>, commit <sha>' (the reference dir's name alone when it names the device)."""
    where = source if source.startswith("reference: ") else _src_label(source, slug)
    return f"{what.rstrip(': ')}\n{where}, commit {_commit(t, source, slug)}"


def _impl_legend(fig, impls, extra=(), ncol=5):
    """One legend under the figure: colour = impl, plus any extra handles (the paper's lines)."""
    impls = [i for i in IMPLS if i in set(impls)]
    handles = [Line2D([], [], color=IMPL_COLORS[i], lw=2, marker="o", label=i) for i in impls] + list(extra)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(ncol, len(handles)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.0))


# --- (1) time vs elements ---------------------------------------------------------------------------

def figure_time(t: Tables, png, svg=None):
    """Quantize + dequantize time vs elements, log-log, one column per GPU source. Top: the paper's
    comparison (its serial CPU loop against its four GPU kernels; the paper's own points dashed).
    Bottom: ours (the fast kernel against PyTorch on the same GPU and the threaded CPU baseline)."""
    _theme()
    ours = _paper_setting(quant_dequant_table(t.performance))
    ours = ours[ours["total_ms"].notna()] if len(ours) else ours
    paper = t.paper[t.paper["op"] == QUANT_DEQUANT] if t.paper is not None and len(t.paper) else pd.DataFrame()
    sources = _gpu_sources(ours) or [(THIS_RUN, "no GPU")]
    fig, axes = plt.subplots(2, len(sources), figsize=(6.5 * len(sources), 10), squeeze=False)
    rows = (("the paper's comparison: ", ("cpu_serial", *PAPER_VARIANTS)),
            ("ours: ", ("fast", "cpu_torch", *PEERS)))
    shown = set()
    for col, (src, slug) in enumerate(sources):
        mine = ours[(ours["source"] == src) & (ours["device_slug"] == slug)] if len(ours) else ours
        for row, (what, impls) in enumerate(rows):
            ax = axes[row][col]
            d = mine[mine["impl"].isin(impls)] if len(mine) else mine
            for impl, g in d.groupby("impl", sort=False):
                g = g.sort_values("elements")
                ax.plot(g["elements"], g["total_ms"], marker="o", color=IMPL_COLORS.get(impl, "black"), lw=1.2, ms=5)
                shown.add(impl)
            if row == 0 and len(paper):
                _plot_paper(ax, paper[paper["impl"].isin(impls)], "elements", "time_ms", "--")
            ax.set(xscale="log", yscale="log", xlabel="elements (T x D)", ylabel="quantize + dequantize (ms)",
                   title=_panel_title(t, src, slug, what))
            if not len(d):
                _message(ax, NO_GPU if not _has_gpu(t) else "no rows of these implementations")
    extra = [Line2D([], [], color="grey", marker=PAPER_MARKER, ls="--", label=PAPER_SOURCE)] if len(paper) else []
    _impl_legend(fig, shown | (set(paper["impl"]) if len(paper) else set()), extra)
    fig.suptitle("Quantize + dequantize time (fp32, per-channel; scales excluded, as in the paper)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, png, svg)


# --- (2) speedups --------------------------------------------------------------------------------

def figure_speedup(t: Tables, png, svg=None):
    """Speedup of each GPU kernel over the paper's serial CPU loop (top, with the paper's own speedups
    dashed) and over threaded torch on the CPU (bottom), one column per GPU source."""
    _theme()
    s = t.speedups
    s = _paper_setting(s[s["speedup"].notna()]) if s is not None and len(s) else pd.DataFrame()
    paper = t.paper[(t.paper["op"] == QUANT_DEQUANT) & t.paper["speedup"].notna()] if t.paper is not None and len(
        t.paper) else pd.DataFrame()
    sources = _gpu_sources(s.assign(device="cuda")) if len(s) and "source" in s else []
    sources = sources or [(THIS_RUN, "no GPU")]
    fig, axes = plt.subplots(2, len(sources), figsize=(6.5 * len(sources), 10), squeeze=False)
    shown = set()
    for col, (src, slug) in enumerate(sources):
        for row, (b, label) in enumerate(CPU_BASELINES.items()):
            ax = axes[row][col]
            sb = s[(s["baseline"] == b) & (s["source"] == src) & (s["device_slug"] == slug)] if len(s) else s
            sb = sb if len(sb) else pd.DataFrame(columns=["impl", "elements", "speedup"])
            for impl, g in sb.groupby("impl", sort=False):
                g = g.sort_values("elements")
                ax.plot(g["elements"], g["speedup"], marker="o", color=IMPL_COLORS.get(impl, "black"), lw=1.2, ms=5)
                shown.add(impl)
            if b == "cpu_serial" and len(paper):
                _plot_paper(ax, paper, "elements", "speedup")
            ax.axhline(1.0, color="black", lw=0.6)
            ax.set(xscale="log", yscale="log", xlabel="elements (T x D)", ylabel=f"speedup over {b} (x)",
                   title=_panel_title(t, src, slug, f"vs {b}"))
            if not len(sb):
                _message(ax, NO_GPU if not _has_gpu(t) else f"no GPU speedups over {b}")
    extra = [Line2D([], [], color="grey", marker=PAPER_MARKER, ls="--", label=PAPER_SOURCE)] if len(paper) else []
    _impl_legend(fig, shown | (set(paper["impl"]) if len(paper) else set()), extra)
    fig.suptitle("Speedup of quantize + dequantize over the CPU (fp32, per-channel)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, png, svg)


# --- (3) roofline -----------------------------------------------------------------------------------

def _bandwidth_panels(t: Tables, impls, title: str, paper_impl: str | None, png, svg):
    """Achieved bandwidth as a fraction of the device copy bandwidth measured in the same job (linear,
    0 to 110 %), rows = quantize, dequantize; columns = GPU sources. With ``paper_impl``, the paper's
    best GB/s for that kernel (their GPU) drawn on each panel as a fraction of that panel's copy."""
    _theme()
    perf = _paper_setting(t.performance)
    perf = perf[perf["fraction_of_copy"].notna() & perf["impl"].isin(impls)] if len(perf) else perf
    sources = _gpu_sources(perf) or [(THIS_RUN, "no GPU")]
    paper = t.paper if t.paper is not None and len(t.paper) else pd.DataFrame()
    fig, axes = plt.subplots(2, len(sources), figsize=(6.5 * len(sources), 9), squeeze=False, sharey=True)
    shown = set()
    for col, (src, slug) in enumerate(sources):
        for row, op in enumerate(("quantize", "dequantize")):
            ax = axes[row][col]
            d = perf[(perf["source"] == src) & (perf["device_slug"] == slug) & (perf["op"] == op)] if len(perf) else perf
            for impl, g in d.groupby("impl", sort=False):
                g = g.sort_values("moved_bytes")
                ax.plot(g["moved_bytes"], 100 * g["fraction_of_copy"], marker="o", color=IMPL_COLORS.get(impl, "black"),
                        lw=1.2, ms=5)
                shown.add(impl)
            ax.axhline(100, color="black", lw=1)
            if paper_impl and len(paper) and len(d):
                pg = paper[(paper["op"] == op) & (paper["device"] == "cuda") & (paper["impl"] == paper_impl)]
                copy = float(d["copy_ceiling_gbps"].median())
                if len(pg) and copy > 0:
                    ax.axhline(100 * float(pg["achieved_gbps"].max()) / copy, color=IMPL_COLORS[paper_impl], ls="--",
                               lw=1)
            ax.set(xscale="log", ylim=(0, 112), xlabel="bytes moved (read + written)",
                   ylabel="% of the copy bandwidth (same job)", title=_panel_title(t, src, slug, f"{op}: "))
            if not len(d):
                _message(ax, NO_GPU if not _has_gpu(t) else "no GPU rows")
    extra = [Line2D([], [], color="black", lw=1, label="device copy (100 %)")]
    if paper_impl:
        extra.append(Line2D([], [], color=IMPL_COLORS[paper_impl], ls="--",
                            label=f"{PAPER_SOURCE}: its best {paper_impl} GB/s / this GPU's copy"))
    _impl_legend(fig, shown, extra, ncol=4)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, png, svg)





def figure_roofline(t: Tables, png, svg=None):
    """How close each GPU kernel comes to the copy bandwidth of its own GPU, per op and GPU source."""
    return _bandwidth_panels(t, GPU_IMPLS, "Achieved bandwidth of the GPU kernels, as a share of each GPU's copy "
                             "bandwidth (fp32, per-channel)", "vectorized", png, svg)


# --- (4) accuracy ---------------------------------------------------------------------------------

def figure_accuracy(t: Tables, png, svg=None):
    """Measured errors vs their closed-form predictions (max-abs, L2 vs elements; attention vs D), the
    paper's published errors beside."""
    _theme()
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    acc = _paper_setting(t.accuracy)
    praw = paper_accuracy_table()
    n = np.logspace(4, 9.5, 60)
    dd = np.logspace(np.log2(32), np.log2(16384), 40, base=2)
    closed = {
        "max_abs_error": ("elements", n, np.full_like(n, metrics.paper_predictions(1, 1)["predicted_max_abs_error"])),
        "l2_error": ("elements", n, np.array([metrics.paper_predictions(int(v), 1)["predicted_l2_error"] for v in n])),
        "attention_score_error": ("D", dd, np.array([metrics.paper_predictions(1, int(v))["predicted_attention_score_error"]
                                                     for v in dd])),
    }
    titles = {"max_abs_error": "max-abs reconstruction error", "l2_error": "L2 reconstruction error",
              "attention_score_error": "attention-score error (mean |q.k - q.k_hat|)"}
    bounds = {"max_abs_error": 0.004, "attention_score_error": 0.1}
    markers = _source_markers(acc)
    impls = [i for i in IMPLS if len(acc) and i in set(acc["impl"])]
    for ax, (e, (x, xs, ys)) in zip(axes, closed.items()):
        ax.plot(xs, ys, color="black", lw=1.2, zorder=1)
        if len(praw):
            ax.plot(praw[x], praw[f"paper_{e}"], ls="", marker=PAPER_MARKER, ms=9, color="tab:red",
                    markeredgecolor="black", markeredgewidth=0.4, zorder=2)
        if len(acc):
            d = acc[acc[e].notna()]
            for impl, g in d.groupby("impl"):  # every source's points (bit-exact arithmetic: they coincide)
                ax.plot(g[x], g[e], ls="", marker="o", color=IMPL_COLORS.get(impl, "grey"), ms=5, alpha=0.9,
                        zorder=3)
            ax.plot(d[x], d[f"predicted_{e}"], ls="", marker="_", ms=14, color="black", zorder=4)
        if e in bounds:
            ax.axhline(bounds[e], color="tab:red", ls=":", lw=1)
        ax.set(xscale="log", yscale="log" if e != "max_abs_error" else "linear",
               xlabel="D (head dimension)" if x == "D" else "elements (T x D)", ylabel=e, title=titles[e])
        if e == "max_abs_error":
            ax.set_ylim(0.0036, 0.0041)
        if not len(acc):
            ax.text(0.5, 0.1, "no accuracy measurements", transform=ax.transAxes, ha="center", fontsize=9,
                    bbox=NOTE_BOX)
    pl2 = t.paper_l2 if t.paper_l2 is not None and len(t.paper_l2) else None
    if pl2 is not None:
        last = pl2.sort_values("elements").iloc[-1]
        axes[1].annotate("paper's L2 stops growing\n(float32 accumulation)", xy=(last["elements"], last["paper_l2_error"]),
                         xytext=(0.45, 0.12), textcoords="axes fraction", fontsize=8,
                         arrowprops={"arrowstyle": "->", "color": "black"})
    handles = [Line2D([], [], color="black", lw=1.2, label="closed form, s = 1/127"),
               Line2D([], [], color="black", marker="_", ms=14, ls="", label="predicted from the measured scales"),
               Line2D([], [], color="tab:red", marker=PAPER_MARKER, ls="", markeredgecolor="black",
                      label="paper (published)"),
               Line2D([], [], color="tab:red", ls=":", label="paper's claimed bound")]
    handles += [Line2D([], [], color=IMPL_COLORS.get(i, "grey"), marker="o", ls="", label=f"measured: {i}") for i in impls]
    if markers:
        handles.append(Line2D([], [], ls="", label="sources: " + "; ".join(markers)))
    axes[-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Accuracy: measured (fp32, per-channel) vs the closed form vs the paper")
    return _save(fig, png, svg)


# --- (5) memory ----------------------------------------------------------------------------------

def figure_memory(t: Tables, png, svg=None):
    """Bytes of the cache in fp32 / fp16 vs INT8 + scales, and the compression ratio vs elements."""
    _theme()
    m = t.memory
    n = 0 if m is None or not len(m) else m.drop_duplicates(["T", "D"]).shape[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, max(6, 0.32 * n)))
    if m is None or not len(m):
        _message(ax1, "no memory table")
        _message(ax2, "no memory table")
        return _save(fig, png, svg)
    ch = m[m["granularity"] == "channel"].sort_values("elements")
    fp32 = ch[ch["source_dtype"] == "float32"].drop_duplicates(["T", "D"])
    fp16 = ch[ch["source_dtype"] == "float16"].drop_duplicates(["T", "D"])
    labels = [f"{T}x{D}" for T, D in zip(fp32["T"], fp32["D"])]
    xs = np.arange(len(fp32))
    w = 0.27
    ax1.barh(xs - w, fp32["original_bytes"], w, label="fp32 cache")
    ax1.barh(xs, fp16["original_bytes"].to_numpy()[: len(xs)], w, label="fp16 cache")
    ax1.barh(xs + w, fp32["compressed_bytes"], w, label="INT8 + fp32 scales (per-channel)")
    ax1.set(xscale="log", xlabel="bytes", title="Memory footprint per workload (T x D)")
    ax1.set_yticks(xs, labels, fontsize=8)
    ax1.legend(fontsize=8)
    for (dtype, g), grp in m.groupby(["source_dtype", "granularity"]):
        grp = grp.sort_values("elements")
        ax2.plot(grp["elements"], grp["compression_ratio"], marker="o", label=f"{dtype} -> INT8, per-{g} scales")
    ax2.axhline(4.0, color="tab:red", ls="--", label="paper's claim: 4x (fp32)")
    ax2.axhline(2.0, color="grey", ls=":", label="2x (fp16 source)")
    ax2.set(xscale="log", xlabel="elements (T x D)", ylabel="compression ratio (x)",
            title="Compression ratio, scales included")
    ax2.legend(fontsize=8)
    return _save(fig, png, svg)


# --- (6) peers ----------------------------------------------------------------------------------

def figure_peers(t: Tables, png, svg=None):
    """Our fastest kernel vs PyTorch's own (eager ops, torch.compile, torch.quantize_per_channel), as a
    share of the copy bandwidth of the same job, per op and GPU source."""
    return _bandwidth_panels(t, ("fast", *PEERS), "kvpack's fast kernel vs PyTorch on the same GPU, as a share of its "
                             "copy bandwidth (fp32, per-channel; the paper has no peers)", None, png, svg)


# --- (7) decode step ----------------------------------------------------------------------------

DECODE_LINES = (  # (column, label, colour, line style)
    ("sdpa_best_median_ms", "best fp16 SDPA (fp16 cache)", "tab:blue", "-"),
    ("dequant_sdpa_median_ms", "dequantize INT8, then SDPA", "tab:orange", "-"),
    ("fused_median_ms", "fused INT8 decode (kvpack)", "tab:green", "-"),
    ("int8_byte_bound_ms", "int8 byte bound (copy GB/s)", "black", ":"),
)


def figure_decode(t: Tables, png, svg=None):
    """Time per decode step against the cache length T (one query token per sequence, D = 128): the fastest
    fp16 SDPA backend over the fp16 cache, dequantize-then-SDPA, the fused INT8 kernel, and the int8 byte
    bound (the int8 cache's bytes at the copy bandwidth of the same job); one panel per batch and heads.

    Medians, log-log; one marker per machine. Points that did not fit in memory are missing."""
    from .tables import DECODE_V2

    _theme()
    d = t.decode
    if d is not None and len(d) and "record_format" in d:
        d = d[(d["record_format"] == DECODE_V2) & (d["status"] == "ok")]
    main_d = d[d["head_dim"] == d["head_dim"].mode().iloc[0]] if d is not None and len(d) else d
    if main_d is None or not len(main_d):
        fig, ax = plt.subplots(figsize=(8, 5))
        _message(ax, "no decode-step measurements of the fused kernel\n(rule decode runs on a CUDA GPU)")
        ax.set_xticks([])
        ax.set_yticks([])
        return _save(fig, png, svg)
    batches = sorted(main_d["batch"].dropna().unique())
    heads = sorted({(int(a), int(b)) for a, b in zip(main_d["q_heads"], main_d["kv_heads"])}, key=lambda h: -h[1])
    fig, axes = plt.subplots(len(batches), len(heads), figsize=(5.5 * len(heads), 3.8 * len(batches)),
                             squeeze=False, sharex=True)
    markers = _source_markers(main_d)
    for i, b in enumerate(batches):
        for j, (hq, hkv) in enumerate(heads):
            ax = axes[i][j]
            g = main_d[(main_d["batch"] == b) & (main_d["q_heads"] == hq) & (main_d["kv_heads"] == hkv)]
            for (src, slug), gs in g.groupby(["source", "device_slug"]):
                gs = gs.sort_values("T")
                for col, label, colour, ls in DECODE_LINES:
                    y = gs.get(col)
                    if y is None or not y.notna().any():
                        continue
                    ax.plot(gs["T"], y, ls=ls, color=colour, marker=markers.get(_src_label(src, slug), "o"),
                            label=label)
            kind = "MHA" if hq == hkv else "GQA"
            ax.set(xscale="log", yscale="log", title=f"B = {int(b)}, {kind} Hq = {hq}, Hkv = {hkv}",
                   xlabel="cached tokens T" if i == len(batches) - 1 else "",
                   ylabel="ms per decode step" if j == 0 else "")
    handles = [Line2D([], [], color=c, ls=ls, label=lab) for _, lab, c, ls in DECODE_LINES]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=src) for src, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9,
               bbox_to_anchor=(0.5, -0.02 - 0.02 * (len(handles) > 4)))
    D = int(main_d["head_dim"].iloc[0])
    gran = "/".join(sorted(str(x) for x in main_d["granularity"].dropna().unique())) or "?"
    fig.suptitle(f"One decode step over an fp16 vs an INT8 KV cache (D = {D}, fp16 queries, {gran} scales)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, png, svg)


E2E_COLORS = {"kvpack": "tab:green", "fp16_graph": "tab:blue", "static": "tab:purple", "dynamic": "tab:orange",
              "quantized": "tab:red"}


def _e2e_color(method: str) -> str:
    for prefix, colour in E2E_COLORS.items():
        if method.startswith(prefix):
            return colour
    return "grey"


def figure_e2e(t: Tables, png, svg=None):
    """A real model's decode step (Llama-3.1-8B's shape), every method: ms per step, horizontal bars, one
    panel per device x (T, batch), with the step's byte bounds (weights + the fp16 or INT8 cache at the
    copy rate of the same job) as vertical lines. Shorter is faster; left of the fp16 line is faster
    than any fp16 cache can be."""
    from .tables import E2E_LABELS

    _theme()
    e = t.e2e
    ok = e[(e["status"] == "ok") & ~e["capacity"].astype(bool)] if e is not None and len(e) else None
    if ok is None or not len(ok):
        fig, ax = plt.subplots(figsize=(8, 4))
        _message(ax, "no end-to-end measurements\n(rule e2e runs on a CUDA GPU)")
        ax.set_xticks([])
        ax.set_yticks([])
        return _save(fig, png, svg)
    panels = sorted({(r.source, r.device_slug, int(r.T), int(r.batch)) for r in ok.itertuples()},
                    key=lambda k: (k[0], k[1], k[2], k[3]))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    n_methods = ok["method"].nunique()
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.38 * n_methods * rows + 1.4 * rows), squeeze=False)
    for ax, (src, slug, T, b) in zip(axes.flat, panels):
        g = ok[(ok["source"] == src) & (ok["device_slug"] == slug) & (ok["T"] == T) & (ok["batch"] == b)]
        g = g.sort_values("step_median_ms", ascending=False)
        labels = [E2E_LABELS.get(m, m) for m in g["method"]]
        ax.barh(labels, g["step_median_ms"], color=[_e2e_color(m) for m in g["method"]],
                xerr=[g["step_median_ms"] - g["step_p10_ms"], g["step_p90_ms"] - g["step_median_ms"]], capsize=2)
        fp16 = g["fp16_byte_bound_ms"].dropna()
        int8 = g[g["method"].str.startswith("kvpack")]["byte_bound_ms"].dropna()
        if len(fp16):
            ax.axvline(float(fp16.iloc[0]), color="tab:blue", ls="--", lw=1)
        if len(int8):
            ax.axvline(float(int8.min()), color="tab:green", ls=":", lw=1)
        ax.set_xscale("log")
        # plain numbers at 1-2-5 steps, no minor labels (they crowd a short log axis)
        ax.xaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
        ax.set_title(f"{slug}: T = {T}, batch {b}", fontsize=10)
        ax.set_xlabel("ms per decode step (median, p10-p90)")
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color="tab:blue", ls="--", label="fp16 byte bound (weights + fp16 cache at the copy rate)"),
               Line2D([], [], color="tab:green", ls=":", label="INT8 byte bound (weights + INT8 cache + scales)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, bbox_to_anchor=(0.5, -0.01))
    model = ", ".join(sorted(str(m) for m in ok["model"].dropna().unique()))
    fig.suptitle(f"A decode step of {model} (random bf16 weights) by cache and attention path", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return _save(fig, png, svg)


FIGURES = {
    "time": figure_time,
    "speedup": figure_speedup,
    "roofline": figure_roofline,
    "accuracy": figure_accuracy,
    "memory": figure_memory,
    "peers": figure_peers,
    "decode": figure_decode,
    "e2e": figure_e2e,
}


def make_figure(name: str, tables: Tables, png, svg=None):
    """Draw figure ``name`` (a key of FIGURES) from ``tables`` into ``png`` and ``svg``."""
    try:
        fn = FIGURES[name]
    except KeyError:
        raise ValueError(f"unknown figure {name!r}; known: {sorted(FIGURES)}") from None
    return fn(tables, png, svg)


__all__ = ["FIGURES", "IMPL_COLORS", "figure_accuracy", "figure_decode", "figure_e2e", "figure_memory", "figure_peers", "figure_roofline",
           "figure_speedup", "figure_time", "make_figure"]
