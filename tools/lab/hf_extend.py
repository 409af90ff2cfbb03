"""What a step of several new tokens over a filled cache costs in a transformers model (chunked
prefill, assisted generation's verification; --chunk 1: a decode step): kvpack.hf's KVPackCache (INT8,
INT4) against transformers' DynamicCache under "sdpa", in one run.

A random-weight Llama (4 layers, 8 query / 2 KV heads, head_dim 128); half the batch left-padded by
a quarter of the prompt, so the cached lengths differ; then steps of --chunk tokens. Wall time a
step (the GPU synchronised around it on CUDA), median and range over the steps after a first
repetition:

    python tools/lab/hf_extend.py --batch 8 --prompt 512 --chunk 8 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    import transformers

    import kvpack.hf as kh

    dev = torch.device(args.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                   max_position_embeddings=args.prompt + args.steps * args.chunk + 16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvpack", dtype=dtype)
    model = model.to(dev).eval()
    b, p, c = args.batch, args.prompt, args.chunk
    ids = torch.randint(1, 101, (b, p), device=dev)
    mask = torch.ones_like(ids)
    mask[1::2, : p // 4] = 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    caches = {
        "kvpack_int8": lambda: kh.KVPackCache(cfg, b, p + args.steps * c, device=dev, dtype=dtype),
        "kvpack_int4": lambda: kh.KVPackCache(cfg, b, p + args.steps * c, device=dev, dtype=dtype, bits=4),
        "dynamic_sdpa": lambda: transformers.DynamicCache(config=cfg),
    }
    print(f"{dev.type}, batch {b}, prompt {p} (half the batch padded by {p // 4}), steps of {c} tokens")
    for name, make in caches.items():
        ts = []
        with torch.no_grad():
            for rep in range(args.reps):
                cache = make()
                kw = {kh.cache_kwarg(): cache}
                model.set_attn_implementation("kvpack" if name.startswith("kvpack") else "sdpa")
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kw)
                m = mask
                for _ in range(args.steps):
                    chunk = torch.randint(1, 101, (b, c), device=dev)
                    m = torch.cat([m, torch.ones(b, c, dtype=m.dtype, device=dev)], 1)
                    pos = (m.cumsum(-1) - 1)[:, -c:]
                    sync()
                    t0 = time.perf_counter()
                    model(input_ids=chunk, attention_mask=m, position_ids=pos, **kw)
                    sync()
                    if rep:
                        ts.append(time.perf_counter() - t0)
        print(f"  {name:13s} median {1e3 * statistics.median(ts):8.2f} ms a step  "
              f"(min {1e3 * min(ts):.2f}, max {1e3 * max(ts):.2f}, n = {len(ts)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
