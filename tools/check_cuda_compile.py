#!/usr/bin/env python3
"""Compile every kernels/*.cu with nvcc, for sm_80 and sm_90, against the venv's torch headers.

No GPU needed: it runs `nvcc -c` only (the objects go to a temporary folder), with the flags the
JIT build uses (torch.utils.cpp_extension's COMMON_NVCC_FLAGS and C++ standard, -O3, never
--use_fast_math). Prints one line per file, writes each file's ptxas resource report
(-Xptxas -v) to the log folder, and fails on:
  - any compile error;
  - any local memory (stack frame, spill stores or loads) in the kernels of quantize_fast.cu;
  - a kvpack:: function that one object calls and no object defines (checked with nm).
With --sass (needs cuobjdump) it also disassembles the sm_90 object of quantize_fast.cu and counts
its global accesses by width (LDG.E.128 / STG.E.128 ...) and local ones (LDL / STL, must be none).

    python tools/check_cuda_compile.py [--jobs 2] [--arch 80,90] [--log-dir build/cuda-compile]
                                       [--keep-objects DIR] [--sass] [FILE.cu ...]

Exit status: 0 all good, 1 a failure, 2 nvcc not found.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
# Kernel files whose kernels must use no local memory (checked from the ptxas report).
NO_SPILL_FILES = ("quantize_fast.cu",)


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_tool(nvcc: str, name: str) -> str | None:
    beside = Path(nvcc).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def torch_flags() -> tuple[list[str], list[str]]:
    """Include flags and defines as torch.utils.cpp_extension would pass them to nvcc."""
    import torch
    from torch.utils import cpp_extension

    incs = cpp_extension.include_paths()  # the CPU list: the CUDA one needs CUDA_HOME at import
    flags = [f for p in incs for f in ("-isystem", p)]
    defines = list(cpp_extension.COMMON_NVCC_FLAGS)
    defines += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=kvpack_ext_cuda"]
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    if abi is not None:
        defines.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}")
    # A CPU-only torch wheel ships c10/cuda headers without the generated cuda_cmake_macros.h
    # (it only sets C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows): skip it there.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in incs):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags, defines


def torch_cxx_std() -> str:
    """The -std flag torch.utils.cpp_extension gives nvcc (kvpack/build.py sets none of its own)."""
    import inspect

    from torch.utils import cpp_extension

    return "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "-std=c++17"


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], check=False, input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def parse_ptxas(text: str) -> list[dict]:
    """One dict per (kernel, arch) from `-Xptxas -v` output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            rows.append(cur)
            cur = None
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        name = name.replace("kvpack::cuda::(anonymous namespace)::", "").replace("kvpack::cuda::", "")
        row["name"] = re.sub(r"\(.*\)$", "", name).removeprefix("void ")
    return rows


def compile_one(nvcc: str, src: Path, out_dir: Path, common: list[str], archs: list[str]) -> dict:
    obj = out_dir / (src.stem + ".o")
    cmd = [nvcc, "-c", str(src), "-o", str(obj), *common, "-Xptxas", "-v"]
    # A file without kernels (no __global__, no <<<...>>> launch, no .cuh) has no device code to
    # check per architecture: one device pass is enough (each costs ~35 s with the torch headers).
    text = src.read_text()
    host_only = not re.search(r"__global__|<<<|\.cuh\b", text)
    for a in archs[-1:] if host_only else archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    return {
        "src": src,
        "obj": obj,
        "ok": proc.returncode == 0,
        "seconds": time.perf_counter() - t0,
        "output": proc.stdout + proc.stderr,
        "cmd": cmd,
    }


def sass_report(nvcc: str, obj: Path, arch: str) -> tuple[bool, str]:
    cuobjdump = find_tool(nvcc, "cuobjdump")
    if not cuobjdump:
        return True, "SASS: cuobjdump not found, skipped (pip install nvidia-cuda-cuobjdump, or a full toolkit)"
    proc = subprocess.run(
        [cuobjdump, "-sass", "-arch", f"sm_{arch}", str(obj)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return False, f"SASS: cuobjdump failed: {proc.stderr.strip()[:500]}"
    lines = [
        f"SASS of {obj.name} (sm_{arch}), global loads / stores by width in bits, local accesses (must be 0)",
        "  LDG:128 64 <=32  STG:128 64 <=32  LDL STL  kernel",
    ]
    ok = True
    for block in re.split(r"\n\s*Function : ", proc.stdout)[1:]:
        name = demangle([block.split("\n", 1)[0].strip()])[0]
        name = re.sub(r"\(.*\)$", "", name.replace("kvpack::cuda::(anonymous namespace)::", ""))
        name = name.replace("kvpack::cuda::", "").removeprefix("void ")
        counts = []
        for op in ("LDG", "STG"):
            widths = re.findall(rf"\b{op}\.E((?:\.[A-Z0-9]+)*)", block)
            n128 = sum(".128" in w for w in widths)
            n64 = sum(".64" in w for w in widths)
            counts += [n128, n64, len(widths) - n128 - n64]
        ldl = len(re.findall(r"\bLDL\b", block))
        stl = len(re.findall(r"\bSTL\b", block))
        ok &= not (ldl or stl)
        lines.append("      {:3d} {:2d} {:4d}     {:3d} {:2d} {:4d}  {:3d} {:3d}  {}".format(*counts, ldl, stl, name))
    return ok, "\n".join(lines)


def check_symbols(objects: list[Path]) -> tuple[bool, str]:
    """Every kvpack:: function one object calls is defined by another (the launchers.h contract)."""
    nm = shutil.which("nm")
    if not nm:
        return True, "symbols: nm not found, skipped"
    defined, undefined = set(), set()
    for obj in objects:
        out = subprocess.run([nm, "-C", str(obj)], check=False, capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split(None, 2) if not line.startswith(" ") else ["", *line.split(None, 1)]
            if len(parts) < 3 or not parts[2].startswith("kvpack::"):
                continue
            (undefined if parts[1] == "U" else defined).add(parts[2])
    missing = sorted(undefined - defined)
    if missing:
        return False, "symbols: used but defined by no kernels/*.cu:\n" + "\n".join("      " + m for m in missing)
    return True, f"symbols: all {len(undefined)} kvpack:: functions used across files are defined"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="files compiled at once (default 2)")
    ap.add_argument("--arch", default="80,90", help="SM versions, comma-separated (default 80,90)")
    ap.add_argument("--log-dir", default=str(ROOT / "build" / "cuda-compile"), help="ptxas reports go here")
    ap.add_argument("--keep-objects", help="write the objects here instead of a temporary folder")
    ap.add_argument("--sass", action="store_true", help="check the SASS of quantize_fast.cu (needs cuobjdump)")
    ap.add_argument("files", nargs="*", help="compile only these .cu files (default: kernels/*.cu)")
    args = ap.parse_args(argv)
    args.arch = [a.strip().removeprefix("sm_") for a in args.arch.split(",") if a.strip()]

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    sources = [Path(f).resolve() for f in args.files] or sorted(KERNELS.glob("*.cu"))
    if not sources:
        print(f"no .cu files under {KERNELS}", file=sys.stderr)
        return 1
    inc_flags, defines = torch_flags()
    # The JIT build's flags (kvpack/build.py, torch.utils.cpp_extension), never --use_fast_math.
    common = [torch_cxx_std(), "-O3", "-lineinfo", "-Xcompiler", "-fPIC", *defines, *inc_flags, f"-I{KERNELS / 'include'}"]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    version = (
        subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True).stdout.strip().splitlines()
    )
    print(
        f"nvcc: {nvcc} ({version[-1] if version else '?'}); archs: {', '.join('sm_' + a for a in args.arch)}; "
        f"{len(sources)} files, {args.jobs} at a time"
    )

    t0 = time.perf_counter()
    tmp = None
    if args.keep_objects:
        out_dir = Path(args.keep_objects)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kvpack-nvcc-")
        out_dir = Path(tmp.name)
    failed = False
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(compile_one, nvcc, s, out_dir, common, args.arch) for s in sources]
            results = [f.result() for f in futures]
        for r in results:
            rel = r["src"].relative_to(ROOT) if r["src"].is_relative_to(ROOT) else r["src"]
            (log_dir / f"{r['src'].stem}.log").write_text(" ".join(r["cmd"]) + "\n\n" + r["output"])
            if not r["ok"]:
                failed = True
                print(f"FAIL  {rel}  ({r['seconds']:.1f} s)")
                errors = [ln for ln in r["output"].splitlines() if "error" in ln] or r["output"].splitlines()
                print("\n".join("      " + ln for ln in errors[:20]))
                continue
            kernels = parse_ptxas(r["output"])
            warnings = [ln for ln in r["output"].splitlines() if "warning" in ln.lower()]
            spilled = [k for k in kernels if k["stack"] or k["spill_st"] or k["spill_ld"]]
            regs = max((k["regs"] for k in kernels), default=0)
            if kernels:
                note = f"{len(kernels)} kernels x archs, max {regs} registers, "
                note += f"local memory in {len(spilled)}" if spilled else "no local memory"
            else:
                note = "host code only, one device pass"
            if warnings:
                note += f", {len(warnings)} warnings"
            status = "OK  "
            if spilled and r["src"].name in NO_SPILL_FILES:
                status, failed = "FAIL", True
            print(f"{status}  {rel}  ({r['seconds']:.1f} s; {note})")
            for w in warnings[:10]:
                print("      " + w)
            for k in spilled:
                print(f"      {k['arch']}: {k['name']}: stack {k['stack']} B, spill {k['spill_st']}/{k['spill_ld']} B")
            if r["src"].name in NO_SPILL_FILES:
                table = [
                    f"{k['arch']} regs={k['regs']:3d} stack={k['stack']} spill={k['spill_st']}/{k['spill_ld']}  {k['name']}"
                    for k in kernels
                ]
                (log_dir / f"{r['src'].stem}.ptxas.txt").write_text("\n".join(table) + "\n")
                for line in table:
                    print("      " + line)
        if not failed and not args.files:  # only the whole set can define everything it uses
            ok, text = check_symbols([r["obj"] for r in results])
            print(text)
            failed |= not ok
        if args.sass and not failed:
            fast = [r for r in results if r["src"].name == "quantize_fast.cu"]
            arch = "90" if "90" in args.arch else args.arch[-1]
            for r in fast:
                ok, text = sass_report(nvcc, r["obj"], arch)
                (log_dir / "quantize_fast.sass.txt").write_text(text + "\n")
                print(text)
                failed |= not ok
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"{'FAILED' if failed else 'all compiled'} in {time.perf_counter() - t0:.1f} s; ptxas reports in {log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
