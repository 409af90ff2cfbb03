"""Perplexity of a small trained causal LM through each KV cache (issue 17): what INT8 and INT4 caches
cost a model with real (trained) weights, measured through the cache code a user calls
(``kvpack.hf.KVPackCache`` under the "kvpack" attention backend).

No pretrained decoder ships in a package that installs here and nothing can be downloaded, so the
study trains its own: a Llama-architecture model (4 layers, hidden 256, 4 query and 2 KV heads of
head_dim 64, vocabulary = the 256 byte values) on text every machine has, the top-level modules of
the Python standard library (sorted by name; every 20th file is held out). Bytes are the tokens.

    python tools/perplexity.py train --out data/models/stdlib-llama [--steps 1200]
    python tools/perplexity.py eval --model data/models/stdlib-llama [--out perplexity.json]

Evaluation: ``n_seqs`` held-out windows of ``seq_len`` bytes, teacher forced: the first
``prefill`` bytes in one prefill step, then one byte per decode step through the cache, the
negative log-likelihood of every byte after the prefill summed. Methods: ``exact`` (transformers'
DynamicCache, fp32: the reference), ``int8_token``, ``int8_channel``, ``int4_token_g32``,
``int4_channel`` (INT4 keys per channel, values per group of 32), all on the CPU in fp32.

What it can and cannot tell: such a model has the architecture of Llama (RoPE, GQA, SwiGLU, RMSNorm)
and trained attention (peaked where a real model's is, on recent and matching tokens), which random
weights do not have; it has 3 M parameters, 4 layers and a context of hundreds of bytes, not an 8B
model's 32 layers, outlier channels and 100k-token contexts. A perplexity change here is evidence of
the order of the effect, not a prediction for Llama-3.1-8B.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

MODEL_CONFIG = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
                "rope_theta": 10000.0, "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": None,
                "eos_token_id": None}
TRAIN_DEFAULTS = {"steps": 1200, "batch": 16, "seq_len": 256, "lr": 3e-3, "warmup": 50, "weight_decay": 0.1, "seed": 0}
# (evaluation windows no longer than the training ones: RoPE positions past them were never trained)
EVAL_DEFAULTS = {"n_seqs": 32, "seq_len": 256, "prefill": 32, "seed": 0}
METHODS = ("exact", "int8_token", "int8_channel", "int4_token_g32", "int4_channel")
HELD_OUT_EVERY = 20


# --- the corpus -------------------------------------------------------------------------------------

def corpus_files() -> list[Path]:
    """The standard library's top-level modules, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def corpus(split: str) -> bytes:
    """The training text (every file but each 20th) or the held-out text (each 20th), concatenated."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    files = corpus_files()
    keep = [f for i, f in enumerate(files) if (i % HELD_OUT_EVERY == 0) == (split == "heldout")]
    return b"".join(f.read_bytes() for f in keep)


def describe(text: bytes) -> dict:
    return {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest(), "python": sys.version.split()[0]}


# --- the model ---------------------------------------------------------------------------------------

def make_model(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**MODEL_CONFIG)
    return transformers.LlamaForCausalLM(config)


def train(out: str | Path, *, steps: int = TRAIN_DEFAULTS["steps"], batch: int = TRAIN_DEFAULTS["batch"],
          seq_len: int = TRAIN_DEFAULTS["seq_len"], lr: float = TRAIN_DEFAULTS["lr"],
          warmup: int = TRAIN_DEFAULTS["warmup"], weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
          seed: int = TRAIN_DEFAULTS["seed"], device: str = "cpu", provenance: dict | None = None,
          log=print) -> dict:
    """Train the model on the training text (random windows, AdamW, cosine schedule) and save it
    (safetensors, bf16) with its training record (settings, loss curve, corpus, time, machine)."""
    text = corpus("train")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    model = make_model(seed).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    curve = []
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).to(device)
        loss = model(input_ids=x, labels=x, use_cache=False).loss  # (transformers shifts the labels by one)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            curve.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0})
            log(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    record = {"kind": "perplexity_training", "model": MODEL_CONFIG,
              "settings": {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup,
                           "weight_decay": weight_decay, "seed": seed, "device": device},
              "corpus": {"train": describe(text), "heldout": describe(corpus("heldout")),
                         "files": f"top-level *.py of the standard library, every {HELD_OUT_EVERY}th held out"},
              "curve": curve, "seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters()),
              "provenance": provenance or {}}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# --- evaluation ---------------------------------------------------------------------------------------

def load_model(path: str | Path, dtype=torch.float32):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def heldout_windows(n_seqs: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_seqs`` windows of ``seq_len`` held-out bytes at seeded positions: long [n_seqs, seq_len]."""
    text = corpus("heldout")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (n_seqs,), generator=gen)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()])


def make_cache(method: str, model, batch: int, max_len: int):
    import transformers

    import kvpack.hf as kh

    if method == "exact":
        return transformers.DynamicCache(config=model.config), "sdpa"
    bits = 4 if method.startswith("int4") else 8
    granularity = "channel" if method.endswith("channel") else "token"
    return kh.KVPackCache(model.config, batch, max_len, granularity=granularity, device="cpu", dtype=torch.float32,
                          bits=bits, group_size=32), "kvpack"


def nll(model, ids: torch.Tensor, prefill: int, method: str) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[:, prefill:] given everything before, teacher
    forced through ``method``'s cache (one prefill step, then one decode step per byte)."""
    import kvpack.hf as kh

    b, n = ids.shape
    cache, attn = make_cache(method, model, b, n)
    model.set_attn_implementation(attn)
    kw = kh.cache_kwarg()
    total = 0.0
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], **{kw: cache})
        logp = torch.log_softmax(out.logits[:, -1].double(), -1)
        total -= float(logp.gather(1, ids[:, prefill:prefill + 1]).sum())
        for t in range(prefill, n - 1):
            pos = torch.full((b, 1), t)
            out = model(input_ids=ids[:, t:t + 1], position_ids=pos, **{kw: cache})
            logp = torch.log_softmax(out.logits[:, -1].double(), -1)
            total -= float(logp.gather(1, ids[:, t + 1:t + 2]).sum())
    return total, b * (n - prefill)


def evaluate(model_path, *, methods=METHODS, n_seqs: int = EVAL_DEFAULTS["n_seqs"],
             seq_len: int = EVAL_DEFAULTS["seq_len"], prefill: int = EVAL_DEFAULTS["prefill"],
             seed: int = EVAL_DEFAULTS["seed"], provenance: dict | None = None, log=print) -> dict:
    """The perplexity record (kind 'perplexity'): per method the summed NLL, bytes scored, perplexity
    and its ratio to the exact cache's, from the same windows."""
    model = load_model(model_path)
    ids = heldout_windows(n_seqs, seq_len, seed)
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        total, count = nll(model, ids, prefill, m)
        rows.append({"method": m, "nll_nats": total, "tokens": count, "nll_per_token": total / count,
                     "perplexity": math.exp(total / count), "seconds": time.perf_counter() - t0})
        log(f"{m:16s} perplexity {rows[-1]['perplexity']:.4f}  ({count} bytes, {rows[-1]['seconds']:.0f} s)")
    exact = next((r for r in rows if r["method"] == "exact"), None)
    for r in rows:
        r["vs_exact"] = r["perplexity"] / exact["perplexity"] if exact else math.nan
    return {"kind": "perplexity", "model": str(model_path), "settings": {"n_seqs": n_seqs, "seq_len": seq_len,
                                                                        "prefill": prefill, "seed": seed},
            "heldout": describe(corpus("heldout")), "rows": rows, "provenance": provenance or {}}


__all__ = ["EVAL_DEFAULTS", "METHODS", "MODEL_CONFIG", "TRAIN_DEFAULTS", "corpus", "corpus_files", "evaluate",
           "heldout_windows", "load_model", "make_cache", "make_model", "nll", "train"]
