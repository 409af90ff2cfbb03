"""Every kernels/*.cu compiles with nvcc for sm_80 and sm_90 (tools/check_cuda_compile.py).

Needs nvcc (a CUDA toolkit), not a GPU: runs on the CPU-only CI machine. Skipped without nvcc.
Takes a few minutes on 2 cores (the torch headers dominate).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_cuda_compile.py"


def _tool():
    spec = importlib.util.spec_from_file_location("check_cuda_compile", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ptxas_report_is_parsed():
    text = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 368 bytes cmem[0]
"""
    (row,) = _tool().parse_ptxas(text)
    assert (row["arch"], row["regs"], row["stack"], row["spill_st"], row["spill_ld"]) == ("sm_90", 40, 16, 8, 4)
    assert row["name"].startswith("foo")


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    if _tool().find_nvcc() is None:
        pytest.skip("nvcc not found (no CUDA toolkit here; set CUDA_HOME or put nvcc on PATH)")
    sources = sorted((ROOT / "kernels").glob("*.cu"))
    assert sources, "no kernels/*.cu"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--arch", "80,90", "--log-dir", str(tmp_path / "logs")],
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for src in sources:
        assert f"OK    kernels/{src.name}" in out, out
    # The fast kernels' register report was written and shows no local memory.
    report = (tmp_path / "logs" / "quantize_fast.ptxas.txt").read_text()
    for kernel in ("quantize_fast_kernel", "dequantize_fast_kernel", "elementwise_flat_kernel"):
        assert kernel in report, f"{kernel} missing from the register report of quantize_fast.cu"
    assert all(line.endswith(">") and "stack=0 spill=0/0" in line for line in report.splitlines() if line), report


def test_sass_tile_finds_the_tile_loop():
    """tools/lab/sass_tile.py: of a kernel's backward-branch loops that hold mma and non-coherent loads,
    the one with the most mma (every unrolled tile), and of those the shortest."""
    spec = importlib.util.spec_from_file_location("sass_tile", ROOT / "tools" / "lab" / "sass_tile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = [
        (0x00, "S2R R0, SR_TID.X"),
        (0x10, "LDG.E.CONSTANT R2, desc[UR4][R4.64]"),  # the loop's first instruction (0x10) ...
        (0x20, "HMMA.16816.F32 R8, R12, R16, R8"),
        (0x30, "@P0 FMUL R1, R1, 0.5"),
        (0x40, "HMMA.16816.F32 R8, R12, R18, R8"),
        (0x50, "@P1 BRA 0x10"),  # ... and its back edge: 5 instructions, 2 mma
        (0x60, "HMMA.16816.F32 R8, R12, R16, R8"),
        (0x70, "@P2 BRA 0x40"),  # a loop with one mma and no load: not a tile loop
        (0x80, "LDG.E.128.STRONG.GPU R20, desc[UR4][R6.64]"),
        (0x90, "BRA 0x0"),  # the outer loop: the most mma, but longer
        (0xA0, "EXIT"),
    ]
    sass = "\n\tFunction : _Z6kernelv\n" + "\n".join(f"        /*{a:04x}*/ {i} ;" for a, i in lines) + "\n"
    ((name, ins),) = list(module.functions(sass))
    assert name == "_Z6kernelv" and len(ins) == len(lines)
    loop = module.tile_loop(ins)
    assert len(loop) == 10 and sum("HMMA" in i for i in loop) == 3  # the outer loop holds all three mma
    inner = module.tile_loop([x for x in ins if x[0] <= 0x50])
    assert [module.opcode(i) for i in inner] == ["LDG.E.CONSTANT", "HMMA.16816.F32", "FMUL", "HMMA.16816.F32", "BRA"]
