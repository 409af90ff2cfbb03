"""The honest CPU baseline's thread count: what the process may use (affinity, cgroup quota, torch's
default), read from mocked cgroup files so the tests do not depend on this machine, and the choice
between that count and one thread made by timing the op itself."""

import pytest
import torch

from kvpack.study import bench, cpu_threads


def cgroup(tmp_path, files: dict, proc: str = "0::/\n"):
    """A fake cgroup mount under tmp_path/cg and a fake /proc/self/cgroup; returns (root, proc path)."""
    root = tmp_path / "cg"
    root.mkdir(parents=True)
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    proc_path = tmp_path / "proc_self_cgroup"
    proc_path.write_text(proc)
    return root, proc_path


def limits(tmp_path, files, proc="0::/\n", affinity=4, torch_default=16):
    root, proc_path = cgroup(tmp_path, files, proc)
    return cpu_threads.cpu_limits(root, proc_path, affinity=affinity, torch_default=torch_default)


def test_v2_fractional_quota_rounds_up(tmp_path):
    lim = limits(tmp_path, {"cpu.max": "150000 100000\n"})
    assert lim["cgroup_quota_cpus"] == pytest.approx(1.5)
    assert lim["usable"] == 2 and "cpu.max" in lim["cgroup_source"]


def test_v2_exact_quota_is_not_rounded_up(tmp_path):
    assert limits(tmp_path, {"cpu.max": "200000 100000"})["usable"] == 2


def test_v2_max_quota_is_the_affinity(tmp_path):
    lim = limits(tmp_path, {"cpu.max": "max 100000"})
    assert lim["cgroup_quota_cpus"] is None and lim["usable"] == 4 and lim["cgroup_source"].startswith("no quota")


def test_affinity_without_quota_files(tmp_path):
    lim = limits(tmp_path, {})
    assert lim == {"affinity": 4, "cgroup_quota_cpus": None, "cgroup_source": lim["cgroup_source"],
                   "torch_default": 16, "usable": 4}
    assert "no cgroup CPU files" in lim["cgroup_source"]


def test_v1_quota_and_period(tmp_path):
    lim = limits(tmp_path, {"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, affinity=16)
    assert lim["cgroup_quota_cpus"] == pytest.approx(2.5) and lim["usable"] == 3
    assert "cpu.cfs_quota_us" in lim["cgroup_source"]


def test_v1_no_quota(tmp_path):
    lim = limits(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert lim["cgroup_quota_cpus"] is None and lim["usable"] == 4


def test_own_cgroup_from_proc_self_cgroup(tmp_path):
    # The mount shows the host's tree: the process's own cgroup directory holds the quota.
    v2 = limits(tmp_path / "a", {"cpu.max": "max 100000", "kubepods/pod1/cpu.max": "100000 100000"}, proc="0::/kubepods/pod1\n")
    assert v2["cgroup_quota_cpus"] == pytest.approx(1.0) and v2["usable"] == 1
    v1 = limits(tmp_path / "b", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                                 "cpu/docker/abc/cpu.cfs_quota_us": "300000", "cpu/docker/abc/cpu.cfs_period_us": "100000"},
                proc="4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n")
    assert v1["cgroup_quota_cpus"] == pytest.approx(3.0) and v1["usable"] == 3


def test_torch_default_and_affinity_bound_it(tmp_path):
    assert limits(tmp_path, {"cpu.max": "800000 100000"}, affinity=16, torch_default=2)["usable"] == 2
    assert limits(tmp_path / "x", {"cpu.max": "800000 100000"}, affinity=3, torch_default=16)["usable"] == 3


def test_unparsable_files_are_no_quota(tmp_path):
    lim = limits(tmp_path, {"cpu.max": "garbage"})
    assert lim["cgroup_quota_cpus"] is None and lim["usable"] == 4


def test_this_machine():
    lim = cpu_threads.cpu_limits()
    assert 1 <= lim["usable"] <= min(lim["affinity"], lim["torch_default"])


# ---- the choice between the usable count and one thread ----------------------------------------

def fake_timer(ms_by_threads, seen=None):
    def timer(fn):
        n = torch.get_num_threads()
        if seen is not None:
            seen.append(n)
        return ms_by_threads[n], f"timing at {n}"
    return timer


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before  # choose_threads restores it
    torch.set_num_threads(before)


def test_one_thread_wins_a_floor(keep_threads):
    c, timing = cpu_threads.choose_threads(lambda: None, {"usable": 2}, timer=fake_timer({2: 16.0, 1: 0.02}))
    assert c["threads"] == 1 and c["threads_usable"] == 2 and c["threads_choice"].startswith("1: faster")
    assert c["threads_median_ms"] == {"2": 16.0, "1": 0.02} and timing == "timing at 1"


def test_usable_wins_when_threads_pay(keep_threads):
    c, timing = cpu_threads.choose_threads(lambda: None, {"usable": 2}, timer=fake_timer({2: 4.5, 1: 30.0}))
    assert c["threads"] == 2 and c["threads_choice"].startswith("2: usable, faster than 1") and timing == "timing at 2"


def test_a_tie_keeps_the_usable_count(keep_threads):
    c, _ = cpu_threads.choose_threads(lambda: None, {"usable": 3}, timer=fake_timer({3: 1.0, 1: 1.0}))
    assert c["threads"] == 3


def test_long_calls_skip_the_one_thread_timing(keep_threads):
    seen = []
    c, _ = cpu_threads.choose_threads(lambda: None, {"usable": 2}, timer=fake_timer({2: 900.0}, seen),
                                      calibrate_max_ms=250)
    assert c["threads"] == 2 and seen == [2] and "1 thread not timed" in c["threads_choice"]


def test_one_usable_thread_is_timed_once(keep_threads):
    seen = []
    c, timing = cpu_threads.choose_threads(lambda: None, {"usable": 1}, timer=fake_timer({1: 0.5}, seen))
    assert c["threads"] == 1 and seen == [1] and c["threads_median_ms"] == {"1": 0.5} and timing == "timing at 1"


def test_default_timer_runs_the_op(keep_threads):
    calls = []
    c, samples = cpu_threads.choose_threads(lambda: calls.append(torch.get_num_threads()), {"usable": 2})
    assert calls == [2] * 4 + [1] * 4 and c["threads"] in (1, 2) and len(samples) == 3  # warm-up + 3 at each


# ---- the benchmark job records the choice -------------------------------------------------------

def test_benchmark_job_records_the_thread_choice(monkeypatch):
    before = torch.get_num_threads()
    fake = {"affinity": 16, "cgroup_quota_cpus": 1.5, "cgroup_source": "fake cpu.max: 150000 100000",
            "torch_default": 16, "usable": 2}
    monkeypatch.setattr(cpu_threads, "cpu_limits", lambda *a, **k: dict(fake))
    rec = bench.run_benchmark_job({"T": 128, "D": 32}, "cpu", {"cpu_repeats": 2}, {"device": "cpu"})
    assert torch.get_num_threads() == before
    rows = {(r["impl"], r["op"]): r for r in rec["rows"] if r["status"] == "ok"}
    for op in ("scales", "quantize", "dequantize"):
        t = rows[("cpu_torch", op)]
        assert t["threads"] in (1, 2) and t["threads_usable"] == 2 and t["threads_choice"]
        assert set(t["threads_median_ms"]) == {"1", "2"}  # both timed: a tiny op takes far under 250 ms
        assert t["median_ms"] == t["threads_median_ms"][str(t["threads"])]  # the row is the winner's timing
        assert t["cpu_affinity"] == 16 and t["cgroup_cpu_quota"] == 1.5 and t["torch_default_threads"] == 16
        assert rows[("cpu_serial", op)]["threads"] == 1
