"""GPU slots of a local GPU run (kvpack.pipeline.gpu_slots, issue 21), on the CPU with N GPUs faked:
never two jobs on one GPU, every GPU used, a crashed job's GPU given back; and the workflow's plan
(the resource `gpu`, printed by a dry run) on a `device: cuda` config."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpack.pipeline import gpu_slots

ROOT = Path(__file__).resolve().parent.parent


def _job(ids, lock_dir, hold_s, log_path, crash=False):
    slot = gpu_slots.acquire(ids, lock_dir, wait_s=60, poll_s=0.02)
    start = time.monotonic()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == slot.gpu == os.environ[gpu_slots.SLOT_ENV]
    if crash:
        os._exit(3)  # no release: the kernel drops the lock with the process
    time.sleep(hold_s)
    end = time.monotonic()
    with open(log_path, "a") as f:
        f.write(f"{slot.gpu} {start} {end}\n")


def _run(n_jobs, ids, tmp_path, hold_s=0.3, crash=()):
    ctx = mp.get_context("spawn")
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_job, args=(ids, tmp_path / "locks", hold_s, log, i in crash)) for i in range(n_jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return [(g, float(a), float(b)) for g, a, b in rows], [p.exitcode for p in procs]


def test_each_job_owns_its_gpu_and_every_gpu_is_used(tmp_path):
    rows, codes = _run(6, ["0", "1"], tmp_path)
    assert codes == [0] * 6 and len(rows) == 6
    assert {g for g, _, _ in rows} == {"0", "1"}
    for i, (g1, a1, b1) in enumerate(rows):
        for g2, a2, b2 in rows[i + 1:]:
            if a1 < b2 and a2 < b1:  # overlapping in time: never on the same GPU
                assert g1 != g2
    # at most two at once: at no job's start were two others already running
    for g, a, _ in rows:
        assert sum(1 for _, x, y in rows if x <= a < y) <= 2


def test_a_crashed_job_gives_its_gpu_back(tmp_path):
    rows, codes = _run(3, ["7"], tmp_path, hold_s=0.1, crash=(0,))
    assert sorted(codes) == [0, 0, 3]
    assert [g for g, _, _ in rows] == ["7", "7"]  # one GPU: the two others ran after the crash, in turn


def test_slot_ids_follow_cuda_visible_devices_and_the_limit(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert gpu_slots.slot_ids() == ["3", "5", "6"]
    assert gpu_slots.slot_ids(2) == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_slots.slot_ids(count=4) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="no GPU to take"):
        gpu_slots.acquire([])


def test_hold_gpu_takes_a_slot_only_in_a_local_gpu_run(monkeypatch, tmp_path):
    from kvpack.pipeline import jobs

    monkeypatch.delenv(gpu_slots.SLOTS_ENV, raising=False)
    assert jobs.hold_gpu() is None
    monkeypatch.setenv(gpu_slots.SLOTS_ENV, "4,2")
    monkeypatch.setattr(gpu_slots, "LOCK_DIR", tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    slot = jobs.hold_gpu()
    try:
        assert slot.gpu == "4" and os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    finally:
        slot.release()


def _dry_run(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "--config", "device=cuda",
                           "device_name=fake-gpu", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          env=env,
                          timeout=300)


def test_dry_run_of_a_gpu_plan_shows_the_limit():
    run = _dry_run("gpus=2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "GPU jobs run one per GPU, at most 2 at once, on GPU 0, 1" in run.stderr
    run = _dry_run("gpus=2", "--resources", "gpu=1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "at most 1 at once, on GPU 0 " in run.stderr
