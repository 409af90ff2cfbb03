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
