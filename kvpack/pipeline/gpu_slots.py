"""GPU slots of a local run: each GPU job owns one GPU, and a machine's GPUs are all used.

Snakemake limits how many GPU jobs run at once (the resource ``gpu``, which the workflow provides
as the number of GPUs this machine shows, or less: config ``gpus``, ``--resources gpu=N``); this
module decides *which* GPU a job gets. A job holds an exclusive lock on one slot file per GPU
(``fcntl.flock``: the kernel drops it when the process ends, crash included, so a dead job gives its
GPU back) and sets ``CUDA_VISIBLE_DEVICES`` to that GPU before anything touches CUDA. With at most N
jobs for N GPUs, a free slot always exists; a job that finds none waits for one.

    slot = gpu_slots.acquire(["0", "1"])      # -> GpuSlot(gpu='1', ...); CUDA_VISIBLE_DEVICES=1
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

SLOT_ENV = "KVPACK_GPU_SLOT"  # the physical GPU a job holds (its provenance records it)
SLOTS_ENV = "KVPACK_GPU_SLOTS"  # the GPUs a local run's GPU jobs share (set by the workflow, comma-separated)
LOCK_DIR = Path(".snakemake") / "kvpack-gpu-slots"


def visible_gpu_ids(count: int | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs): the
    variable's entries when set, else 0..count-1 (``count``: torch's device count when None)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


def slot_ids(limit: int | None = None, count: int | None = None) -> list[str]:
    """The GPUs GPU jobs may take: every visible one, or the first ``limit`` (config ``gpus``)."""
    ids = visible_gpu_ids(count)
    return ids[:limit] if limit else ids


@dataclass
class GpuSlot:
    gpu: str
    path: Path
    _fh: object

    def release(self) -> None:
        """Give the GPU back (also done by the kernel when the process ends)."""
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def acquire(ids: list[str], lock_dir: Path | str | None = None, wait_s: float = 24 * 3600,
            poll_s: float = 0.2) -> GpuSlot:
    """Take the first free GPU of ``ids`` (waiting up to ``wait_s`` for one) and make it this process's
    only visible GPU. Lock files are per host (a shared filesystem seen by several nodes keeps their
    GPUs apart). Must run before CUDA is initialised in this process."""
    if not ids:
        raise ValueError("no GPU to take: the run sees none (CUDA_VISIBLE_DEVICES, or config gpus)")
    d = Path(lock_dir or LOCK_DIR)
    d.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    deadline = time.monotonic() + wait_s
    while True:
        for gpu in ids:
            path = d / f"{host}-gpu{gpu}.lock"
            fh = open(path, "a+")  # noqa: SIM115 - held open for the life of the slot
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            os.environ[SLOT_ENV] = gpu
            return GpuSlot(gpu, path, fh)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {ids} after {wait_s:.0f} s (slot files in {d})")
        time.sleep(poll_s)


__all__ = ["LOCK_DIR", "SLOTS_ENV", "SLOT_ENV", "GpuSlot", "acquire", "slot_ids", "visible_gpu_ids"]
