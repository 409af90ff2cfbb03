#!/usr/bin/env python3
"""Run the pipeline's decode study without Snakemake (a GPU machine that lacks it): the jobs of rules
decode and decode_append, the same functions with the same settings and provenance, each record
written where the workflow writes it (OUT/decode/T{T}_B{B}_H{Hq}x{Hkv}_D{D}.json, OUT/decode/append.json).

    python tools/decode_grid.py --out results/h100 [--config config/config.yaml ...] [--device-name h100]
                                [--time-limit 400] [--points T32768_B8_H32x8_D128 ...]

Points run in the grid's order; after --time-limit seconds no further point starts (the missing ones
are listed, never written as rows). Records are the output of a real run: commit them as they are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpack.pipeline import config as kvconfig
from kvpack.pipeline import environment
from kvpack.pipeline.jobs import job_provenance
from kvpack.study import decode_step, records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the run's results/{device} folder")
    ap.add_argument("--config", nargs="*", default=["config/config.yaml"], help="config files, merged in order")
    ap.add_argument("--device-name", default=None, help="the results/{device} slug (default: detected)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds after which no further point starts")
    ap.add_argument("--points", nargs="*", default=None,
                    help="only these point names (decode_step.point_name), in this order")
    args = ap.parse_args(argv)
    cfg = kvconfig.load_config(*args.config)
    device = environment.resolve_device("cuda")
    settings = kvconfig.job_settings(cfg, "decode")
    points = kvconfig.decode_points(cfg)
    if args.points:  # in the order given (the most wanted first, when time is short)
        by_name = {decode_step.point_name(p): p for p in points}
        unknown = [n for n in args.points if n not in by_name]
        if unknown:
            ap.error(f"not points of the config's decode grid: {unknown}; there: {list(by_name)}")
        points = [by_name[n] for n in args.points]
    out = Path(args.out) / "decode"
    t0 = time.perf_counter()
    left = []
    for p in points:
        name = decode_step.point_name(p)
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            left.append(name)
            continue
        payload = {"settings": settings, "device": device, "point": p}
        record = decode_step.run_decode_point_job(p, settings, device, job_provenance(device, args.device_name, payload))
        records.write_record(record, out / f"{name}.json")
        r = record["rows"][0]
        print(f"{name}: {r['status']} sdpa {r.get('sdpa_best_median_ms', float('nan')):.4f} ms, INT8 "
              f"{r.get('fused_speedup_vs_sdpa', float('nan')):.2f}x, INT4 {r.get('int4_speedup_vs_sdpa', float('nan')):.2f}x, "
              f"paged p16/contiguous INT8 {r.get('paged_p16_vs_fused', float('nan')):.3f} "
              f"INT4 {r.get('int4_paged_p16_vs_int4', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if cfg["decode"]["append"] and not left:
        s = kvconfig.job_settings(cfg, "decode_append")
        payload = {"settings": s, "device": device}
        rec = decode_step.run_append_job(s, device, job_provenance(device, args.device_name, payload))
        records.write_record(rec, out / "append.json")
        print(f"append: {rec['rows'][0]['append_median_us']:.1f} us", flush=True)
    if left:
        print(f"not started (time limit): {' '.join(left)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
