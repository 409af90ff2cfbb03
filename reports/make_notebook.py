"""Writes reports/report.ipynb, the papermill template of the report (the .ipynb is committed).

    python reports/make_notebook.py        # after editing the cells below

The notebook computes nothing a test can't reach: every number comes from kvpack.report.tables /
kvpack.report.claims functions over the CSVs of results/tables; cells only call them and display. The
HTML is rendered without code cells (nbconvert --no-input), so headings and text come from
markdown cells and from Markdown() outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parent / "report.ipynb"

PARAMETERS = '''\
# Parameters (papermill injects the run's values in a cell after this one).
tables_dir = "results/tables"      # the CSVs of kvpack.report.assemble.write_tables
figures_dir = "results/figures"    # <name>.png of kvpack.report.figures.FIGURES
device = "unknown"                 # this run's device slug
title = "kvpack: INT8 KV-cache quantization, a replication of arXiv 2601.04719"
paper_dir = "reports/paper"        # the paper's published numbers and claims
skipped_notes = []                 # extra lines for "What was skipped" (from the workflow)
'''

SETUP = '''\
from pathlib import Path

import pandas as pd
from IPython.display import HTML, Image, Markdown, display

from kvpack.report import claims as kc
from kvpack.report import figures as kf
from kvpack.report import tables as kt

pd.set_option("display.max_rows", 500)
pd.set_option("display.max_columns", 60)
pd.set_option("display.max_colwidth", 400)

t = kt.read_tables(tables_dir)
# the verdicts are computed, never stored: a claims.csv without them per source (written by an older kvpack)
# is judged again from the other tables
claims = t.claims = t.claims if "source" in t.claims.columns else kc.claims_table(t, Path(paper_dir) / "claims.yaml")
notes = list(dict.fromkeys(list(skipped_notes) + kt.skip_notes(t.performance, t.accuracy)))


def show(df, columns=None, digits=3):
    display(HTML(kt.for_display(df, columns, digits).to_html(index=False, border=0)))
'''

def md(text: str) -> tuple[str, str]:
    return ("md", text)


def code(text: str) -> tuple[str, str]:
    return ("code", text)


CELLS = [
    code('display(Markdown(f"# {title}\\n\\nThis run: device `{device}`. A replication of arXiv 2601.04719 '
             '(Taneja & Shingvi, *GPU-Accelerated INT8 Quantization for KV Cache Compression in Large Language '
             'Models*); the paper\'s published numbers sit beside ours throughout, labelled *paper*."))'),
    md("## Summary"),
    code('display(Markdown("\\n".join(f"- {line}" for line in kc.summary_lines(t))))\n'
             'if notes:\n'
             '    display(Markdown("**Note:** " + notes[0]))'),
    md("## Workloads\n\nThe run's grid; `in_paper_grid` marks the shapes the paper measured (its names beside)."),
    code("show(t.workloads)"),
    md("## Performance\n\nMedian time of quantize + dequantize (ms), the paper's timed pair (scales excluded), "
           "per workload and implementation, for each machine (`source`: this run or a committed reference run). "
           "Every row of `performance.csv` holds the median, p10/p90, bytes moved, achieved GB/s and the fraction "
           "of the copy bandwidth measured in the same job."),
    code("show(kt.performance_summary(t.performance))"),
    md("Achieved bandwidth (GB/s = bytes moved / median time) of quantize and dequantize, beside the copy "
           "bandwidth measured in the same job (GPU rows where a machine has a GPU):"),
    code('for op in ("quantize", "dequantize"):\n'
             '    display(Markdown(f"**{op}**"))\n'
             '    show(kt.bandwidth_summary(t.performance, op))'),
    md("## Speedups\n\nSpeedup of each GPU implementation over **both** CPU baselines of the same machine: "
           "`cpu_serial` is the paper's baseline (serial loops walking row-major data column by column), "
           "`cpu_torch` is multi-threaded PyTorch on the same CPU (the honest baseline). `paper_*` columns: the "
           "paper's published speedups over its own CPU at the same shape."),
    code('sp = kt.speedup_summary(t.speedups)\n'
             'if len(sp):\n'
             '    show(sp)\n'
             'else:\n'
             '    display(Markdown("*No GPU speedups: no GPU measurements in this run or in a reference directory.*"))\n'
             '    show(t.paper[(t.paper["op"] == "quant+dequant") & (t.paper["device"] == "cuda")], '
             '["source", "workload", "T", "D", "impl", "time_ms", "speedup"])'),
    md("## Accuracy\n\nMeasured errors beside their closed-form predictions (from the measured scales; "
           "`*_ratio` = measured / predicted) and the paper's published errors. L2 and max-abs: reconstruction "
           "error of K; attention: mean over rows of |q·k − q·k̂| for one query q uniform in [−1, 1]."),
    code('show(t.accuracy, ["source", "device_slug", "workload", "T", "D", "dtype", "impl", "granularity", "status", '
             '"max_abs_error", "predicted_max_abs_error", "paper_max_abs_error", "l2_error", "predicted_l2_error", '
             '"l2_error_ratio", "paper_l2_error", "attention_score_error", "predicted_attention_score_error", '
             '"attention_score_error_ratio", "paper_attention_score_error", "bit_exact_vs_reference"], digits=4)'),
    md("## Memory\n\nBytes of the cache before and after: INT8 values plus one fp32 scale per channel "
           "(or per token), for an fp32 and an fp16 source. The paper claims 4× over fp32."),
    code('m = t.memory[t.memory["granularity"] == "channel"] if len(t.memory) else t.memory\n'
             'show(m, ["workload", "T", "D", "in_paper_grid", "source_dtype", "original_bytes", "int8_bytes", '
             '"scales_bytes", "compressed_bytes", "compression_ratio", "scales_overhead_fraction"], digits=4)'),
    md("## Claims\n\nEvery claim of the paper (and three of ours), judged separately on each source: this run and "
           "each committed reference run, each on its own machine's rows alone (kvpack.report.claims). One column per "
           "source, side by side; `summary` groups the sources by verdict. *reproduced* / *not reproduced*: that "
           "source's numbers agree / disagree with the claim; *needs a CUDA GPU*: that source ran without a GPU; *not "
           "measurable here*: that source lacks the data (a shape not in its grid, a baseline skipped, no records of "
           "that kind). One source's verdict never stands in for another's."),
    code("show(kc.claims_side_by_side(claims))"),
    md("Each verdict with our value, where it comes from and the rule applied (one row per claim and source):"),
    code('show(claims, ["claim_id", "source", "device", "verdict", "paper_value", "our_value", "our_source", "note"])'),
    md("### The paper's L2 errors and float32 accumulation"),
    code("display(Markdown(kc.paper_l2_note(t.paper_l2)))\n"
             "show(t.paper_l2 if len(t.paper_l2) else kc.paper_l2_check(paper_dir), digits=3)"),
    md("## Decode step: fp16 attention vs the INT8 cache\n\nWhat \"negligible overhead\" means at decode time, "
           "where each generated token reads the whole cache once (kvpack.study.decode_step, one job per grid point, "
           "GPU only). Each row is one shape (T cached tokens, B sequences, Hq query heads, Hkv KV heads, head "
           "dimension D), all measured in one job: fp16 `scaled_dot_product_attention` over the fp16 cache with each "
           "SDPA backend that runs it (flash, cuDNN, efficient; the fastest, `sdpa_best`, is the baseline of every "
           "ratio), dequantize-then-SDPA (the paper's path), and the fused INT8 kernel (`kvpack.decode_attention`). "
           "`*_speedup_vs_sdpa` > 1 means faster than the best fp16 SDPA; `fused_fraction_of_int8_bound` is the "
           "INT8 cache's bytes at the copy bandwidth measured in the same job (`copy_gbps`) over the fused time. "
           "Medians (ms). On a CPU-only run these rows come from the reference runs of record."),
    code('dv = kt.decode_view(t.decode)\n'
             'if len(dv):\n'
             '    show(dv, digits=3)\n'
             '    png = Path(figures_dir) / "decode.png"\n'
             '    if png.exists():\n'
             '        display(Image(filename=str(png)))\n'
             '        display(Markdown("*Time per decode step against T: the best fp16 SDPA backend, dequantize-then-SDPA, '
             'the fused INT8 kernel and the int8 byte bound; one panel per batch and heads (D = 128).*"))\n'
             'else:\n'
             '    display(Markdown("*No decode-step measurement of the fused kernel (a CUDA GPU is needed).*"))\n'
             'old = t.decode[t.decode["record_format"].astype(str).str.startswith("v1")] if len(t.decode) else t.decode\n'
             'if len(old):\n'
             '    display(Markdown("Earlier decode records (torch\'s default SDPA, dequantize-then-SDPA, no fused kernel; '
             'superseded by the rows above where a machine has both):"))\n'
             '    show(old, ["source", "device_slug", "T", "batch", "q_heads", "head_dim", "sdpa_best_median_ms", '
             '"dequant_sdpa_median_ms", "dequant_sdpa_speedup_vs_sdpa"], digits=4)\n'
             'if len(t.decode_append):\n'
             '    display(Markdown("Appending one token to every sequence (quantized on write, one launch):"))\n'
             '    show(t.decode_append, ["source", "device_slug", "batch", "kv_heads", "head_dim", "granularity", '
             '"append_median_us", "append_p10_ms", "append_p90_ms"], digits=3)\n'
             'if len(t.decode_int4):\n'
             '    display(Markdown("The INT4 kernel (issue 17) beside INT8 and fp16, from the INT4 bench records '
             '(tools/bench_decode.py; a reference folder\'s int4/):"))\n'
             '    show(t.decode_int4, ["source", "device_slug", "git_commit", "T", "batch", "q_heads", "kv_heads", '
             '"head_dim", "sdpa_best_median_ms", "fused_median_ms", "int4_median_ms", "int4_speedup_vs_sdpa", '
             '"int4_vs_fused", "int4_fraction_of_int4_bound"], digits=4)\n'
             'if len(t.decode_peers):\n'
             '    display(Markdown("kvpack\'s paged INT8 decode beside FlashInfer\'s fp16 paged decode, one job per '
             'machine (tools/bench_paged_peers.py; `paged_vs_fi_fp16_speedup` above 1: kvpack ahead):"))\n'
             '    show(t.decode_peers, ["source", "device_slug", "T", "batch", "q_heads", "kv_heads", "page_size", '
             '"kvpack_int8_median_ms", "kvpack_int8_paged_median_ms", "fi_fp16_best_median_ms", '
             '"paged_vs_fi_fp16_speedup"], digits=4)\n'
             'if len(t.decode_api):\n'
             '    display(Markdown("What one public `kvpack.decode_attention` call costs, microseconds (tools/'
             'bench_decode_api.py): the default call, the raw op, the call that checks lengths on the host, and its '
             'kernels alone (a CUDA graph\'s replay):"))\n'
             '    show(t.decode_api, ["source", "device_slug", "T", "batch", "q_heads", "kv_heads", "default_us", '
             '"raw_op_us", "check_lengths_us", "graph_us", "default_over_graph"], digits=4)\n'
             'labels = kc.source_labels(claims)\n'
             'for cid in ("decode_overhead", "decode_speed_target", "serving_decode", "int4_decode", "int4_quality"):\n'
             '    for _, r in claims[claims["claim_id"] == cid].iterrows():\n'
             '        label = labels[(str(r["source"]), "" if pd.isna(r["device_slug"]) else str(r["device_slug"]))]\n'
             '        display(Markdown(f"**{cid} on {label}: {r[\'verdict\']}.** "\n'
             '                         + (f"{r[\'our_value\']} ({r[\'our_source\']}). " if r["our_value"] else "") + r["note"]))'),
    md("### Accuracy of fused INT8 decoding\n\nThe INT8 cache attended by the fused kernel (on a CPU: the "
           "extension's CPU op; `path` says which) against float64 attention over the unquantized fp16 cache, on "
           "uniform, outlier-channel and the real model's (all-MiniLM-L6-v2) K/V, per scale granularity "
           "(kvpack.study.decode_accuracy). `max_abs_error`, `rel_l2_error`: the output's error; `fp16_sdpa_*`: fp16 "
           "SDPA's own error on the same cache, for scale; `top1_agreement`: the fraction of queries whose "
           "most-attended token is unchanged (the INT8 side's weights computed in float64 from the dequantized "
           "cache: the fused kernel returns no weights)."),
    code('if len(t.decode_accuracy):\n'
             '    show(t.decode_accuracy, ["source", "device_slug", "path", "distribution", "bits", "granularity", "status", '
             '"T", "head_dim", "queries", "max_abs_error", "rel_l2_error", "fp16_sdpa_max_abs_error", '
             '"fp16_sdpa_rel_l2_error", "top1_agreement", "skip_reason"], digits=3)\n'
             'else:\n'
             '    display(Markdown("*No decode accuracy record (config decode.accuracy.enabled is off).*"))'),
    md("## End to end: a real model's decode step\n\nWhat the INT8 cache buys inside a transformers model "
       "(kvpack.study.e2e, rule e2e, GPU only): Llama-3.1-8B's shape with random bf16 weights (a decode step's time "
       "does not depend on their values), each method's cache filled to T with random K/V, decode steps timed in "
       "one job beside the copy bandwidth. `vs_fp16_bound` > 1: the step is faster than any fp16 cache can be (the "
       "weights it reads plus the fp16 cache, at the copy rate); `vs_fp16_graph`: against the same captured decode "
       "loop over an fp16 cache with the fastest SDPA backend; `vs_best_transformers`, `vs_quantized_cache`: "
       "against transformers' own paths in the same job."),
    code('ev = kt.e2e_view(t.e2e)\n'
         'if len(ev):\n'
         '    show(ev, digits=3)\n'
         '    png = Path(figures_dir) / "e2e.png"\n'
         '    if png.exists():\n'
         '        display(Image(filename=str(png)))\n'
         '        display(Markdown("*ms per decode step by method, per device and (T, batch); dashed: the fp16 byte '
         'bound, dotted: the INT8 byte bound.*"))\n'
         '    skipped = t.e2e[t.e2e["status"] != "ok"]\n'
         '    if len(skipped):\n'
         '        display(Markdown("Methods that did not run:"))\n'
         '        show(skipped, ["source", "device_slug", "T", "batch", "method", "skip_reason"])\n'
         'else:\n'
         '    display(Markdown("*No end-to-end measurement (rule e2e needs a CUDA GPU; no reference run holds e2e '
         'records yet).*"))\n'
         'labels = kc.source_labels(claims)\n'
         'for _, r in claims[claims["claim_id"] == "e2e_decode"].iterrows():\n'
         '    label = labels[(str(r["source"]), "" if pd.isna(r["device_slug"]) else str(r["device_slug"]))]\n'
         '    display(Markdown(f"**e2e_decode on {label}: {r[\'verdict\']}.** "\n'
         '                     + (f"{r[\'our_value\']} ({r[\'our_source\']}). " if r["our_value"] else "") + r["note"]))'),
    md("## Beyond the paper: KV formats, KV-like data and a real model\n\nThe paper measures error on uniform "
           "[-1, 1] data through a dot-product surrogate only. Here the same budget (about one byte per element) "
           "is spent by several formats on KV-like distributions, measured on real attention (softmax "
           "probabilities, attention output with K and V quantized, top-k agreement), and on the K/V of a real "
           "transformer (all-MiniLM-L6-v2) with its downstream sentence embeddings (kvpack.study.formats, "
           "kvpack.study.attention_error, kvpack.study.realmodel)."),
    code('from kvpack.study import formats as kfmt\n\n'
             'study = kfmt.report_summary(tables_dir)\n'
             'for role in ("key", "value"):\n'
             '    w = study.get(f"{role}_winner")\n'
             '    if w:\n'
             '        display(Markdown(f"**Best format for {role}s** (all distributions): " + ", ".join(\n'
             '            f"{k} = {kt.fmt(v, 4) if isinstance(v, float) else v}" for k, v in w.items())))\n'
             'if study.get("formats_summary") is not None:\n'
             '    show(study["formats_summary"], digits=4)\n'
             'if study.get("realmodel") is not None:\n'
             '    display(Markdown("### The real model"))\n'
             '    show(study["realmodel"], digits=5)\n'
             'if study.get("realmodel_stats") is not None:\n'
             '    show(study["realmodel_stats"], digits=3)\n'
             'if study.get("verdict"):\n'
             '    display(Markdown(f"**The paper\'s \\"minimal impact on downstream behavior\\":** {study[\'verdict\']}"))\n'
             'for n in study.get("notes", []):\n'
             '    display(Markdown(f"- {n}"))\n'
             'for name in ("formats_error_vs_D", "realmodel_formats"):\n'
             '    png = Path(figures_dir) / f"{name}.png"\n'
             '    if png.exists():\n'
             '        display(Image(filename=str(png)))'),
    md("## Figures"),
    code('captions = {name: (fn.__doc__ or "").strip().split("\\n\\n")[0].replace("\\n", " ") '
             'for name, fn in kf.FIGURES.items()}\n'
             'for name in kf.FIGURES:\n'
             '    png = Path(figures_dir) / f"{name}.png"\n'
             '    display(Markdown(f"### {name}\\n\\n{captions[name]}"))\n'
             '    if png.exists():\n'
             '        display(Image(filename=str(png)))\n'
             '    else:\n'
             '        display(Markdown(f"*figure not drawn: {png.name} missing*"))'),
    md("## What was skipped"),
    code('display(Markdown("\\n".join(f"- {n}" for n in notes) if notes else "Nothing was skipped."))\n'
             'show(kt.skipped_rows(t.performance, t.accuracy))'),
    md("## Provenance\n\nPer source: the machine, torch, CUDA, git commit and config hash of the records. "
           "The paper's numbers: reports/paper/ (the authors' published raw results and summary table)."),
    code("show(t.provenance)"),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = [new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}), new_code_cell(SETUP)]
    for kind, src in CELLS:
        cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    nb.cells = cells
    for i, c in enumerate(nb.cells):  # stable ids: a regenerated notebook diffs cleanly
        c["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    nbformat.write(build(), OUT)
    print(OUT)
