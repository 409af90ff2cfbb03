"""The end-to-end decode benchmark at ad-hoc points (kvpack.study.e2e), one record per context T.

The pipeline's e2e stage runs the config's grid (workflow/rules/e2e.smk); this runs any points,
prints each row as it lands and writes the same records (kind 'e2e'):

    python tools/bench_e2e.py --T 32768 --batch 8 1 32 --out results/e2e [--methods ...] \
        [--compiled-points 32768x8] [--capacity-T 32768] [--device-name h100]

Rows print as: method, T, batch, step median (p10-p90) ms, tokens/s, peak GB, fraction of the byte bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpack.pipeline import environment
from kvpack.pipeline.jobs import job_provenance
from kvpack.study import e2e, records


def show(row: dict) -> None:
    if row.get("status") != "ok":
        print(f"{row['method']:24s} T={row['T']:6d} B={row['batch']:3d}  skipped: {row.get('skip_reason', '')[:110]}",
              flush=True)
        return
    extra = f" backend={row['sdpa_backend']}" if row.get("sdpa_backend") else ""
    extra += f" compile={row['compile_s']:.0f}s" if row.get("compile_s") else ""
    extra += " [largest batch]" if row.get("capacity") else ""
    print(f"{row['method']:24s} T={row['T']:6d} B={row['batch']:3d}  {row['step_median_ms']:8.3f} ms "
          f"({row['step_p10_ms']:.3f}-{row['step_p90_ms']:.3f})  {row['tokens_per_s']:9.1f} tok/s  "
          f"peak {row['peak_memory_bytes'] / 1e9:5.1f} GB  {100 * row.get('fraction_of_bound', float('nan')):5.1f}% "
          f"of bound ({row.get('byte_bound_ms', float('nan')):.3f} ms; fp16 bound "
          f"{row.get('fp16_byte_bound_ms', float('nan')):.3f}){extra}  [{row['seconds']:.0f} s]", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=e2e.DEFAULTS["model"])
    ap.add_argument("--T", type=int, nargs="+", default=e2e.DEFAULTS["T"])
    ap.add_argument("--points", nargs="*", default=None,
                    help="TxB points in this order, all in one record (<model>_<name>.json) instead of one per T")
    ap.add_argument("--name", default="points", help="the record's name with --points: <model>_<name>.json")
    ap.add_argument("--batch", type=int, nargs="+", default=e2e.DEFAULTS["batch"])
    ap.add_argument("--methods", nargs="+", default=e2e.DEFAULTS["methods"], choices=e2e.METHODS)
    ap.add_argument("--compiled-points", nargs="*", default=None,
                    help="TxB points where static_sdpa_compiled runs (each shape compiles anew); default: all")
    ap.add_argument("--capacity-T", type=int, nargs="*", default=e2e.DEFAULTS["capacity_T"])
    ap.add_argument("--capacity-methods", nargs="*", default=e2e.DEFAULTS["capacity_methods"])
    ap.add_argument("--repeats", type=int, default=e2e.DEFAULTS["repeats"])
    ap.add_argument("--out", default="results/e2e")
    ap.add_argument("--device-name", default=None)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds after which no further method starts (its rows: skipped, with the reason)")
    args = ap.parse_args(argv)
    settings = {**e2e.DEFAULTS, "model": args.model, "batch": args.batch, "methods": args.methods,
                "capacity_T": args.capacity_T, "capacity_methods": args.capacity_methods, "repeats": args.repeats}
    if args.compiled_points is not None:
        settings["compiled_points"] = [[int(x) for x in p.split("x")] for p in args.compiled_points]
    if args.time_limit:
        settings["deadline"] = time.time() + args.time_limit
    device = environment.resolve_device("auto")
    if args.points:
        settings["points"] = [[int(x) for x in p.split("x")] for p in args.points]
        args.T = [sorted({p[0] for p in settings["points"]})]
    for T in args.T:
        t0 = time.perf_counter()
        job = {k: v for k, v in settings.items() if k != "deadline"}
        Ts = T if isinstance(T, list) else [T]
        prov = job_provenance(device, args.device_name, {"settings": {**job, "T": Ts}, "device": device})
        out = Path(args.out) / (f"{args.model}_{args.name}.json" if args.points else e2e.record_name(args.model, T))
        partial = {"kind": "e2e", "provenance": prov, "rows": [], "partial": True}

        def log(row, partial=partial, out=out):  # the rows so far, on disk after each: a killed run keeps them
            show(row)
            partial["rows"].append(row)
            records.write_record(partial, out)

        record = e2e.run_e2e_job({**settings, "T": Ts}, device, prov, log=log)
        records.write_record(record, out)
        print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
