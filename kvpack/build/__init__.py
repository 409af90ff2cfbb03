"""Build and load the kvpack extension with torch.utils.cpp_extension (JIT, cached).

The CPU half (op schemas + the paper's serial baseline) builds everywhere; the CUDA half (the
GPU variants) is added when torch sees a CUDA device and a CUDA toolkit. The build directory is
cached: a rebuild happens only when a source or a flag changes.

    python -m kvpack.build [--out build-info.json] [--cpu-only]     (kvpack/build/__main__.py)

This module imports nothing else of kvpack: kvpack.ops imports it to load the extension.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout: kvpack/build/ is two levels down
KERNELS = ROOT / "kernels"
CPU_SOURCES = ("ops.cpp", "cpu_baseline.cpp", "decode_cpu.cpp")
# Host code of the CUDA half, compiled by g++ (never nvcc), built only with the kernels/*.cu files.
CUDA_HOST_SOURCES = ("cuda_ops.cpp", "decode_ops.cpp")

_loaded: dict | None = None


def build_dir(name: str) -> Path:
    base = Path(os.environ.get("KVPACK_BUILD_DIR", ROOT / "build" / "extension"))
    return base / name


def cuda_build_possible() -> tuple[bool, str]:
    """Whether the CUDA half can be built and run here, and why not if not."""
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU-only build"
        return False, "no CUDA device is visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, ""


def cuda_sources() -> list[Path]:
    """The CUDA half: the kernels (*.cu, nvcc) and their torch-facing host code (g++)."""
    return sorted(KERNELS.glob("*.cu")) + [KERNELS / s for s in CUDA_HOST_SOURCES]


def load(cpu_only: bool = False, verbose: bool = False) -> dict:
    """Build (if needed) and load the extension into torch.ops.kvpack; return what was loaded."""
    global _loaded
    if _loaded is not None:
        return _loaded
    from torch.utils import cpp_extension

    use_cuda, reason = (False, "CPU-only build requested") if cpu_only else cuda_build_possible()
    sources = [KERNELS / s for s in CPU_SOURCES]
    name = "kvpack_ext_cpu"
    extra = {}
    if use_cuda:
        sources += cuda_sources()
        name = "kvpack_ext_cuda"
        major, minor = torch.cuda.get_device_capability()
        # Build for the local GPU only (sm_90 on Hopper) unless the user says otherwise.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        # No -std: torch.utils.cpp_extension passes the C++ standard libtorch itself was built with
        # (C++20 since torch 2.10) to g++ and nvcc alike. Never --use_fast_math.
        extra["extra_cuda_cflags"] = ["-O3", "-lineinfo"]
    out = build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    library = cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(KERNELS / "include")],
        extra_cflags=["-O3"],
        # Link the shared libstdc++ that torch itself uses, named explicitly: a g++ whose driver
        # finds only libstdc++.a (the GPU image's /opt/gcc wrapper, $CXX there) otherwise copies
        # libstdc++ into the extension, and a C++ iostream call from it (a TORCH_CHECK message
        # streaming an int64) then runs that private copy on torch's stream state: segfault.
        extra_ldflags=["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [],
        build_directory=str(out),
        is_python_module=False,
        verbose=verbose,
        **extra,
    )
    _loaded = {
        "name": name,
        "library": str(library) if library else str(out / f"{name}.so"),
        "cuda": use_cuda,
        "cuda_skipped_reason": reason,
        "sources": [str(s.relative_to(ROOT)) for s in sources],
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else "",
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return _loaded
