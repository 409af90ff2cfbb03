#!/usr/bin/env python3
"""Instructions per tile of the decode kernels, from their sm_90 SASS: no GPU needed.

A decode step's split kernel is issue-bound where its bytes are few (INT4, D = 64, short steps), so
the count of instructions a warp issues per tile of 16 tokens is a first measure of a kernel change,
before a device says what it is worth. For each variant (a name and nvcc flags), this compiles
kernels/decode_attention.cu and kernels/decode_int4.cu for sm_90 as tools/check_cuda_compile.py does
(the JIT build's flags), with KVPACK_LAB_UNCLAMPED (every tile takes the unclamped loads: the loop
that all tiles but the cache's last run; compiled, never run), disassembles them (cuobjdump and
nvdisasm: a CUDA toolkit's, or `pip download nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` unzipped on
PATH), finds each split kernel's innermost loop that holds both mma and global loads (the tile loop,
kBuffers tiles unrolled) and prints its instructions per tile, with the kinds that weigh most.

    python tools/lab/sass_tile.py                                  # the default kernels
    python tools/lab/sass_tile.py --variant "old=-DKVPACK_FAST_EXP=0 -DKVPACK_FAST_LOADS=0"
    python tools/lab/sass_tile.py --dump "INT8 paged D=64"                 # and its tile loop

Static counts: a branch taken rarely (the output's rescale when the running max moves) counts fully.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_cuda_compile as ccc

# (label, source, mangled-name pattern, tiles per loop): fp16 queries, per-token scales, contiguous.
KERNELS = [
    ("INT8 D=64", "decode_attention.cu", r"decode_split_kernelILi64E6__halfLb1ELb0ELi0E", 2),
    ("INT8 D=128", "decode_attention.cu", r"decode_split_kernelILi128E6__halfLb1ELb0ELi0E", 2),
    ("INT8 paged D=64", "decode_attention.cu", r"decode_split_kernelILi64E6__halfLb1ELb1ELi0E", 2),
    ("INT8 paged D=128", "decode_attention.cu", r"decode_split_kernelILi128E6__halfLb1ELb1ELi0E", 2),
    ("INT8 D=256", "decode_attention.cu", r"decode_split_kernelILi256E6__halfLb1ELb0ELi0E", 1),
    ("INT4 g32 D=64", "decode_int4.cu", r"decode_split_kernelILi64E6__halfLb1ELb0ELi32E", 2),
    ("INT4 g32 D=128", "decode_int4.cu", r"decode_split_kernelILi128E6__halfLb1ELb0ELi32E", 3),
    ("INT4 g32 D=256", "decode_int4.cu", r"decode_split_kernelILi256E6__halfLb1ELb0ELi32E", 1),
    ("INT4 g32 paged D=64", "decode_int4_paged.cu", r"decode_split_kernelILi64E6__halfLb1ELb1ELi32E", 2),
    ("INT4 g32 paged D=128", "decode_int4_paged.cu", r"decode_split_kernelILi128E6__halfLb1ELb1ELi32E", 3),
]


def functions(sass: str):
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        ins = [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", body)]
        yield name.strip(), ins


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]


def tile_loop(ins: list[tuple[int, str]]):
    """The tile loop: of the backward-branch loops that hold mma and (non-coherent) global loads, the
    one with the most mma (every unrolled tile), and of those the shortest (the innermost)."""
    best, key = None, None
    for addr, text in ins:
        m = re.search(r"\bBRA\b\s+(?:\S+,\s*)?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        lo = int(m.group(1), 16)
        seg = [i for a, i in ins if lo <= a <= addr]
        mma = sum("HMMA" in i for i in seg)
        if mma and any("LDG.E" in i and "CONSTANT" in i for i in seg):
            k = (-mma, len(seg))
            if key is None or k < key:
                best, key = seg, k
    return best


def count(variant: str, flags: str, tmp: Path, nvcc: str, cuobjdump: str) -> dict:
    inc, defines = ccc.torch_flags()
    common = [*inc, *defines, ccc.torch_cxx_std(), "-O3", "-I", str(ROOT / "kernels" / "include"),
              "-DKVPACK_LAB_UNCLAMPED=1", *flags.split()]
    out = {}
    for src in sorted({k[1] for k in KERNELS}):
        res = ccc.compile_one(nvcc, ROOT / "kernels" / src, tmp, common, ["90"])
        if not res["ok"]:
            raise SystemExit(f"{variant}: {src} did not compile:\n{res['output'][-3000:]}")
        sass = subprocess.run([cuobjdump, "-sass", str(res["obj"])], check=True, capture_output=True, text=True).stdout
        for label, file, pat, tiles in KERNELS:
            if file != src:
                continue
            for name, ins in functions(sass):
                if re.search(pat, name):
                    seg = tile_loop(ins)
                    out[label] = (len(seg) / tiles, collections.Counter(opcode(i) for i in seg), tiles, seg) if seg else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help='"name=nvcc flags" (repeatable), beside the default')
    ap.add_argument("--top", type=int, default=8, help="instruction kinds shown per kernel (default 8)")
    ap.add_argument("--dump", metavar="KERNEL", default=None, help='print the tile loop of one kernel (e.g. "INT8 paged D=64"), every variant')
    args = ap.parse_args(argv)
    nvcc = ccc.find_nvcc()
    cuobjdump = nvcc and ccc.find_tool(nvcc, "cuobjdump")
    if not nvcc or not cuobjdump:
        print("needs nvcc and cuobjdump (with nvdisasm) on PATH or beside nvcc", file=sys.stderr)
        return 2
    variants = [("default", "")] + [tuple(v.split("=", 1)) for v in args.variant]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in variants:
            results[name] = count(name, flags, Path(tmp), nvcc, cuobjdump)
    names = [n for n, _ in variants]
    print("instructions per tile of 16 tokens (sm_90 SASS, static count of the tile loop)")
    print(f"{'kernel':<18}" + "".join(f"{n:>12}" for n in names))
    for label, *_ in KERNELS:
        cells = [results[n].get(label) for n in names]
        print(f"{label:<18}" + "".join(f"{c[0]:12.0f}" if c else f"{'-':>12}" for c in cells))
    for label, *_ in KERNELS:
        c = results["default"].get(label)
        if c:
            _, ops, tiles, _ = c
            top = ", ".join(f"{k} {v / tiles:.0f}" for k, v in ops.most_common(args.top))
            print(f"  default {label}: {top}")
    for name in names if args.dump else []:
        c = results[name].get(args.dump)
        print(f"\n== {args.dump}, {name}: {len(c[3]) if c else 0} instructions in the loop")
        for i in c[3] if c else []:
            print("   ", i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
