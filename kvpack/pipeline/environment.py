"""Where a run happened: device resolution, a slug for results/{device}/, and provenance.

Every record carries ``provenance(...)``: GPU, driver, CUDA, torch, CPU model and threads (with the
affinity mask and cgroup CPU quota), git commit, config hash and date, so numbers from several
machines can be merged and traced.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .. import ops

ROOT = Path(__file__).resolve().parents[2]  # the checkout
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'. 'cuda' without a GPU is an error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RuntimeError(
            f"device 'cuda' was requested, but torch {torch.__version__} ({build}) sees no CUDA device "
            f"on host {platform.node() or '?'} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            "Run on a GPU node, or use device: auto / cpu."
        )
    return device


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: str) -> str:
    device = resolve_device(device)
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def device_slug(device: str = "auto") -> str:
    """A filesystem-safe name for results/{device}/: the GPU's name, or 'cpu-' + the CPU model."""
    device = resolve_device(device)
    name = device_name(device)
    slug = slugify(name)
    return slug if device == "cuda" else f"cpu-{slug}"


def config_hash(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def _head_and_dirty() -> tuple[str, bool] | None:
    """The checkout's HEAD and whether tracked files differ from it; None without git."""
    commit = _git("rev-parse", "HEAD")
    if commit is None or commit.returncode != 0:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit.stdout.strip(), bool(dirty is not None and dirty.stdout.strip())


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout (``-dirty`` with uncommitted changes); KVPACK_GIT_COMMIT names it where
    the code runs from a copy whose .git is not the tree's (a remote GPU box). Such a copy's .git can be
    an older snapshot: a KVPACK_GIT_COMMIT that is that .git's own HEAD while the files differ from it
    (the variable evaluated on the box, not where the tree was committed) gets ``-dirty`` too, so a
    record never names a commit whose code did not make it."""
    named = os.environ.get("KVPACK_GIT_COMMIT")
    state = _head_and_dirty()
    if named:
        if state is not None and state[1] and state[0].startswith(named) and not named.endswith("-dirty"):
            return named + "-dirty"
        return named
    if state is None:
        return "unknown"
    return state[0] + ("-dirty" if state[1] else "")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def cpu_facts() -> dict:
    """What the CPU lets this process use (kvpack.study.cpu_threads.cpu_limits): the affinity mask, the
    cgroup CPU quota (None: no quota) and where it was read, and the usable count, min(affinity,
    ceil(quota), torch's default), the ceiling of the cpu_torch baseline's threads."""
    from ..study.cpu_threads import cpu_limits

    lim = cpu_limits()
    return {"cpu_affinity": lim["affinity"], "cgroup_cpu_quota": lim["cgroup_quota_cpus"],
            "cgroup_cpu_source": lim["cgroup_source"], "cpu_usable_threads": lim["usable"]}


def _fast_tuning():
    """kvpack.ops.fast_tuning(), or why it could not be read (the extension did not load)."""
    try:
        return ops.fast_tuning()
    except (RuntimeError, OSError) as e:
        return {"error": str(e)}


def provenance(device: str = "auto", config_hash: str = "") -> dict:
    device = resolve_device(device)
    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {
            "gpu_name": props.name,
            "gpu_memory_bytes": int(props.total_memory),
            "gpu_sm_count": int(props.multi_processor_count),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_l2_bytes": int(getattr(props, "L2_cache_size", 0)),
            # which GPU of the machine: the slot a local run's job held (its physical id), else what
            # CUDA_VISIBLE_DEVICES (a cluster's scheduler) or the default device says
            "gpu_index": os.environ.get("KVPACK_GPU_SLOT")
            or os.environ.get("CUDA_VISIBLE_DEVICES", str(torch.cuda.current_device())).split(",")[0],
        }
    return {
        "device": device,
        "device_slug": device_slug(device),
        **({"fast_tuning": _fast_tuning()} if device == "cuda" else {}),
        "device_name": device_name(device),
        **(gpu or {"gpu_name": None}),
        "driver": _driver_version() if device == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        **cpu_facts(),
        "git_commit": git_commit(),
        "config_hash": config_hash,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
