"""Where one graph-captured decode step of the end-to-end benchmark spends its time: the step of
kvpack.study.e2e's graph methods (same model, cache fill and capture), replayed under torch.profiler,
its GPU kernels summed by kind, beside the replay's wall time (CUDA events; wall - kernels = the
gaps between kernels).

    python tools/profile_e2e_step.py --points 32768x8 4096x1 --out results/e2e/profile.json \
        [--methods kvpack_token_graph fp16_graph] [--fp16-backend cudnn]

Prints, per method and point: ms per step by kind (matmuls, kvpack attention, kvpack append, SDPA,
cache writes, everything else), the number of kernels, and the gaps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

# (kind, substrings of the lower-cased kernel name); the first kind that matches takes the kernel
KINDS = (
    ("kvpack attention", ("decode_split_kernel", "decode_combine_kernel")),
    ("kvpack append", ("kv_append_kernel",)),
    ("sdpa", ("cudnn", "fmha", "flash", "attention", "sdpa", "efficient")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "cublas")),
    ("cache write", ("index_copy", "index_put", "scatter")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_point(method: str, model, T: int, batch: int, replays: int, fp16_backend: str) -> dict:
    import kvpack.hf as kh
    from kvpack.study import e2e

    model.set_attn_implementation("kvpack" if method.startswith("kvpack") else e2e.FP16_ATTN)
    cache = e2e.make_cache(method, model, batch, T + 1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    e2e.fill(method, cache, model, batch, T, gen, int(e2e.DEFAULTS["fill_chunk_tokens"]))
    ids, pos = e2e._step_inputs(model, batch, T, gen)
    rewind = e2e._rewinder(method, cache, T)
    if method == "fp16_graph":
        e2e.FP16.tokens, e2e.FP16.backend = T + 1, fp16_backend
    try:
        graph = e2e._graph_step(model, cache, ids, pos, rewind, kh.cache_kwarg())
    finally:
        e2e.FP16.tokens = e2e.FP16.backend = None
    walls = []
    for i in range(replays + 3):
        rewind()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            walls.append(a.elapsed_time(b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            rewind()
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    per_step = {k: v / replays / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    kernel_ms = sum(per_step.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    del graph, cache
    e2e._release()
    return {"method": method, "T": T, "batch": batch, "replays": replays, "wall_median_ms": statistics.median(walls),
            "kernels_per_step": len(kernels) / replays, "kernel_ms": kernel_ms, "ms_by_kind": per_step,
            "gaps_ms": statistics.median(walls) - kernel_ms,
            "top_kernels_ms": [{"name": n[:160], "kind": kind_of(n), "ms_per_step": us / replays / 1e3} for n, us in top]}


def main(argv=None) -> int:
    from kvpack.pipeline import environment
    from kvpack.pipeline.jobs import job_provenance
    from kvpack.study import e2e, records

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=e2e.DEFAULTS["model"])
    ap.add_argument("--points", nargs="+", default=["32768x8", "4096x1"])
    ap.add_argument("--methods", nargs="+", default=["kvpack_token_graph", "fp16_graph"], choices=e2e.GRAPH_METHODS)
    ap.add_argument("--fp16-backend", default="cudnn", choices=("flash", "cudnn", "efficient"))
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--out", default="results/e2e/profile.json")
    ap.add_argument("--device-name", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import kvpack.hf  # noqa: F401  (registers the "kvpack" attention)

    e2e.register_fp16_attention()
    model = e2e.build_model(e2e.load_model_config(args.model), getattr(torch, e2e.DEFAULTS["dtype"]), "cuda")
    device = environment.resolve_device("auto")
    prov = job_provenance(device, args.device_name, {"settings": vars(args), "device": device})
    rows = []
    for p in args.points:
        T, batch = (int(x) for x in p.split("x"))
        for method in args.methods:
            row = profile_point(method, model, T, batch, args.replays, args.fp16_backend)
            rows.append(row)
            kinds = "  ".join(f"{k} {v:.3f}" for k, v in row["ms_by_kind"].items())
            print(f"{method:22s} T={T:6d} B={batch:3d}  wall {row['wall_median_ms']:.3f} ms  kernels "
                  f"{row['kernel_ms']:.3f} ms ({row['kernels_per_step']:.0f})  gaps {row['gaps_ms']:.3f}  | {kinds}",
                  flush=True)
    records.write_record({"kind": "e2e_profile", "provenance": prov, "model": args.model, "rows": rows},
                         Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
