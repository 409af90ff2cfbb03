"""Train the perplexity study's model, or evaluate it through every cache (kvpack.study.perplexity).

    python tools/perplexity.py train --out data/models/stdlib-llama [--steps 1200] [--device cuda]
    python tools/perplexity.py eval --model data/models/stdlib-llama --out data/models/stdlib-llama/perplexity.json

Both write records with the machine's provenance (training.json beside the checkpoint; the eval
record where --out says).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpack.pipeline import environment
from kvpack.study import perplexity as ppl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    for k, v in ppl.TRAIN_DEFAULTS.items():
        t.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    t.add_argument("--device", default="cpu")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--out", default=None)
    e.add_argument("--methods", nargs="+", default=list(ppl.METHODS), choices=ppl.METHODS)
    for k, v in ppl.EVAL_DEFAULTS.items():
        e.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        ppl.train(args.out, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                  weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                  provenance=environment.provenance(args.device))
        return 0
    record = ppl.evaluate(args.model, methods=args.methods, n_seqs=args.n_seqs, seq_len=args.seq_len,
                          prefill=args.prefill, seed=args.seed, provenance=environment.provenance("cpu"))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
