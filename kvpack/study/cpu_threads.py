"""How many threads the honest CPU baseline (``cpu_torch``) may really use, and which it uses.

torch's default thread count is the machine's core count (or the affinity mask), not the CPU time
the process really gets: under a cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` in v1) a process that sees 16 cores may get the time of 2, and other
processes may hold some of the cores. Then each parallel region waits for a thread the kernel has
descheduled, and a small op pays a floor that is not its cost. The H100 and H200 records show it:
cpu_torch 16 ms for scales and dequantize (two parallel regions) and 40-44 ms for quantize (five)
at every size up to 16384x256, against 0.3-0.55 ms for the serial loop at 1024x64. A 2-core box
with one core busy elsewhere and no quota shows the same, 8.0 ms a region at 2 threads, against
0.02 ms for scales at 1024x64 on one thread.

:func:`cpu_limits` reads what the process may use: min(affinity, ceil(quota), torch's default).
:func:`choose_threads` times the op itself at that count and at one thread and keeps the faster:
a quota is read, but other load is only seen by timing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
CALIBRATE_MAX_MS = 250.0  # from this per call at the usable count on, 1 thread is not timed (see choose_threads)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path, proc_cgroup: Path, v1_controller: str | None) -> list[Path]:
    """The cgroup directories to look in: the root of the (namespaced) mount first, then this
    process's own cgroup from /proc/self/cgroup, when the mount shows the host's tree."""
    base = root / v1_controller if v1_controller else root
    dirs = [base]
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, rel = parts
        wanted = (v1_controller in controllers.split(",")) if v1_controller else controllers == ""
        if wanted and rel.strip("/"):
            dirs.append(base / rel.strip("/"))
    return dirs


def cgroup_cpu_quota(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str | os.PathLike = PROC_CGROUP
                     ) -> tuple[float | None, str]:
    """(CPUs the cgroup quota allows, or None for no quota; where that was read, or why nothing was).

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``. cgroup v1:
    ``cpu/cpu.cfs_quota_us`` (-1: no quota) over ``cpu/cpu.cfs_period_us``. The tightest quota of the
    directories found wins (a parent's quota binds its children too).
    """
    root, proc_cgroup = Path(root), Path(proc_cgroup)
    found: list[tuple[float, str]] = []
    seen_any = []
    for d in _own_cgroup_dirs(root, proc_cgroup, None):
        text = _read(d / "cpu.max")
        if text is None:
            continue
        seen_any.append(str(d / "cpu.max"))
        fields = text.split()
        if len(fields) >= 2 and fields[0] != "max":
            try:
                quota, period = float(fields[0]), float(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                found.append((quota / period, f"{d / 'cpu.max'}: {text}"))
    for controller in ("cpu", "cpu,cpuacct"):
        for d in _own_cgroup_dirs(root, proc_cgroup, controller):
            q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if q is None or p is None:
                continue
            seen_any.append(str(d / "cpu.cfs_quota_us"))
            try:
                quota, period = float(q), float(p)
            except ValueError:
                continue
            if quota > 0 and period > 0:
                found.append((quota / period, f"{d / 'cpu.cfs_quota_us'}: {q} / {p}"))
    if found:
        return min(found)
    if seen_any:
        return None, f"no quota ({', '.join(dict.fromkeys(seen_any))})"
    return None, f"no cgroup CPU files under {root}"


def affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_limits(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str | os.PathLike = PROC_CGROUP, *,
               affinity: int | None = None, torch_default: int | None = None) -> dict:
    """What this process may really use: ``usable`` = min(affinity, ceil(cgroup quota), torch default).

    Returns {affinity, cgroup_quota_cpus (None: no quota), cgroup_source, torch_default, usable}.
    ``affinity`` and ``torch_default`` default to this process's (os.sched_getaffinity,
    torch.get_num_threads()); pass them to evaluate another machine's facts.
    """
    aff = affinity_count() if affinity is None else int(affinity)
    default = torch.get_num_threads() if torch_default is None else int(torch_default)
    quota, source = cgroup_cpu_quota(root, proc_cgroup)
    usable = min(aff, default, math.ceil(quota - 1e-9) if quota else aff)
    return {"affinity": aff, "cgroup_quota_cpus": quota, "cgroup_source": source, "torch_default": default,
            "usable": max(1, usable)}


def _median_ms(fn: Callable, repeats: int = 3) -> tuple[float, list[float]]:
    """The default timer: median of ``repeats`` calls after one warm-up; (median ms, samples)."""
    fn()  # warm-up: the first call at a new thread count starts the pool
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return sorted(samples)[len(samples) // 2], samples


def choose_threads(fn: Callable, limits: dict, *, timer: Callable[[Callable], tuple[float, Any]] = _median_ms,
                   calibrate_max_ms: float = CALIBRATE_MAX_MS) -> tuple[dict, Any]:
    """Time ``fn`` (one cpu_torch op on the job's workload) at the usable thread count and at one
    thread, and keep the faster: (the choice, the winner's timing).

    ``timer(fn)`` returns (median ms, timing); the benchmark job passes its own timer, so the
    timing returned is the row's, measured at the chosen count, not a separate calibration. Both
    counts are timed in full: a parallel region that waits for a descheduled thread (a cgroup quota,
    or other processes on the cores; 8 ms a region on a loaded 2-core box) makes the usable count
    slower than one thread, and the serial loop is then not beaten by a wait. When one call at the
    usable count takes ``calibrate_max_ms`` or more, such waits are a small part of it and one
    thread is not timed (it would cost seconds). torch's thread count is restored.

    The choice: {threads, threads_usable, threads_choice (the reason in words),
    threads_median_ms: {count: median ms of each count timed}}.
    """
    usable = max(1, int(limits["usable"]))
    before = torch.get_num_threads()
    choice: dict = {"threads": usable, "threads_usable": usable, "threads_median_ms": {}}
    try:
        torch.set_num_threads(usable)
        t_usable, timing = timer(fn)
        choice["threads_median_ms"][str(usable)] = t_usable
        if usable == 1:
            choice["threads_choice"] = "1: the only usable thread"
            return choice, timing
        if t_usable >= calibrate_max_ms:
            choice["threads_choice"] = (f"{usable}: usable (one call {t_usable:.0f} ms >= {calibrate_max_ms:.0f} ms, "
                                        "1 thread not timed)")
            return choice, timing
        torch.set_num_threads(1)
        t_one, timing_one = timer(fn)
        choice["threads_median_ms"]["1"] = t_one
        if t_one < t_usable:
            choice.update(threads=1, threads_choice=f"1: faster than {usable} ({t_one:.3f} vs {t_usable:.3f} ms)")
            return choice, timing_one
        choice["threads_choice"] = f"{usable}: usable, faster than 1 ({t_usable:.3f} vs {t_one:.3f} ms)"
        return choice, timing
    finally:
        torch.set_num_threads(before)


__all__ = ["CALIBRATE_MAX_MS", "affinity_count", "cgroup_cpu_quota", "choose_threads", "cpu_limits"]
