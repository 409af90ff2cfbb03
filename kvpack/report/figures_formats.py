"""Figures of the accuracy study beyond the paper (issue 6), each a PNG and an SVG, from the tables
of kvpack.study.formats / kvpack.study.realmodel (results/tables/*.csv).

    from kvpack.report import figures_formats as ff
    ff.error_vs_d(pd.read_csv("results/tables/formats.csv"), "formats_error_vs_D.png")
    ff.realmodel_figure(pd.read_csv("results/tables/realmodel.csv"), "realmodel_formats.png")
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..study.formats import FORMATS, PAPER_FORMAT, WIN_METRIC
from .figures import _save  # one way to write a figure: PNG + SVG, closed

NOTE_BOX = {"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "grey"}
METRIC_LABELS = {  # (axis label, title)
    "output_rel_error": ("output rel. error", "attention output relative error ||o - o_hat|| / ||o||"),
    "kl_divergence": ("KL (nats)", "KL(p || p_hat) of the attention probabilities"),
    "rel_l2_error": ("rel. L2 error", "relative L2 reconstruction error"),
    "surrogate_score_error": ("surrogate error", "the paper's surrogate (attention-score error)"),
}


def _message(text: str, png, svg=None):
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", bbox=NOTE_BOX, transform=ax.transAxes)
    return _save(fig, png, svg)


def error_vs_d(df: pd.DataFrame, png, svg=None, metric: str = WIN_METRIC, dtype: str | None = "float32"):
    """``metric`` vs head dimension D: one line per format, a panel per distribution (columns) and
    role (rows: key, value, both), log scale; ``dtype`` selects one input dtype (None: mean over all)."""
    if df is None or df.empty:
        return _message("format study not run\n(accuracy_study.formats is false)", png, svg)
    sns.set_theme(context="notebook", style="whitegrid")
    d = df if dtype is None or dtype not in set(df["dtype"]) else df[df["dtype"] == dtype]
    d = d.groupby(["distribution", "role", "format", "D"], as_index=False)[metric].mean()
    order = [f for f in [*FORMATS, *sorted(set(d["format"]) - set(FORMATS))] if f in set(d["format"])]
    g = sns.relplot(data=d, x="D", y=metric, hue="format", hue_order=order, style="format", style_order=order,
                    col="distribution", row="role", row_order=[r for r in ("key", "value", "both") if r in set(d["role"])],
                    kind="line", markers=True, dashes=False, height=2.8, aspect=1.2, facet_kws={"sharey": "row"})
    g.set(xscale="log", yscale="log")
    ds = sorted(d["D"].unique())
    for ax in g.axes.flat:
        ax.set_xticks(ds)
        ax.set_xticklabels([str(x) for x in ds])
        ax.minorticks_off()
    axis_label, title = METRIC_LABELS.get(metric, (metric, metric))
    g.set_axis_labels("head dimension D", axis_label)
    g.set_titles("{row_name} quantized | {col_name}")
    suffix = f"{dtype} inputs" if dtype else "mean over dtypes"
    g.figure.suptitle(f"{title}, by KV format (the paper's: {PAPER_FORMAT}); {suffix}", y=1.02)
    return _save(g.figure, png, svg)


def realmodel_figure(df: pd.DataFrame, png, svg=None):
    """The real model, per format: 1 - mean cosine (log) and retrieval agreement (top-1, top-5)."""
    if df is None or df.empty or "status" not in df or (df["status"] != "ok").all():
        reason = ""
        if df is not None and "skip_reason" in df and len(df):
            reason = "\n" + str(df["skip_reason"].fillna("").iloc[0])
        return _message("real-model study not run" + reason.replace("; install", ";\ninstall"), png, svg)
    sns.set_theme(context="notebook", style="whitegrid")
    d = df[(df["status"] == "ok") & (df["format"] != "identity")].copy()
    d["1 - mean cosine"] = (1.0 - d["mean_cosine"]).clip(lower=1e-12)
    d["1 - min cosine"] = (1.0 - d["min_cosine"]).clip(lower=1e-12)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    cos = d.melt(id_vars="format", value_vars=["1 - mean cosine", "1 - min cosine"], var_name="statistic")
    sns.barplot(data=cos, x="format", y="value", hue="statistic", ax=a)
    a.set_yscale("log")
    a.set_ylabel("1 - cosine to unquantized")
    a.legend(title="", loc="upper left")
    a.set_xlabel("")
    a.tick_params(axis="x", rotation=30)
    ret_cols = [c for c in d.columns if c.startswith("top") and c.endswith(("_agreement", "_overlap"))]
    ret = d.melt(id_vars="format", value_vars=ret_cols, var_name="retrieval")
    sns.barplot(data=ret, x="format", y="value", hue="retrieval", ax=b)
    b.set_ylim(min(0.9, float(ret["value"].min()) - 0.01), 1.005)
    b.set_ylabel("neighbours kept")
    b.legend(title="retrieval", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    b.set_xlabel("")
    b.tick_params(axis="x", rotation=30)
    r = d.iloc[0]
    fig.suptitle(f"{r.get('model', 'real model')}: K and V of every layer quantized "
                 f"({int(r.get('sentences', 0))} sentences)")
    return _save(fig, png, svg)


FIGURES = {"formats_error_vs_D": error_vs_d, "realmodel_formats": realmodel_figure}
