"""The workflow on a real SLURM cluster: a single node started on localhost (issue 5, docs/cluster.md).

The session fixture installs SLURM and MUNGE with apt-get where they are missing, starts munged,
slurmctld and slurmd from a private temp dir (own config via SLURM_CONF, own ports, own MUNGE
socket, nothing written under /etc), and stops them by PID when the session ends, whatever happened.
The node has two partitions, ``cpu`` (default) and ``gpu``, and three fake GPUs (``Gres=gpu:3``,
device files /dev/null, /dev/zero, /dev/full): a job that asks for a GPU is scheduled and gets
CUDA_VISIBLE_DEVICES, but torch finds no CUDA device behind it, which is how a GPU job on a node
without a usable GPU looks.

No accounting daemon: the plugin is told ``--slurm-status-command squeue`` (MinJobAge keeps
finished jobs in squeue and scontrol for ten minutes), and every submitted job is checked through
its log under .snakemake/slurm_logs/ (named by its SLURM job id) and ``scontrol show job``.

Skipped, with the reason, where SLURM cannot run: not root, no apt-get, apt-get failing (no network
to the mirror), daemons that do not come up. KVPACK_REQUIRE_SLURM=1 turns those skips into failures.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvpack.pipeline import cluster

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "config" / "profiles" / "slurm"
SNAKEFILE = ROOT / "Snakefile"
APT_PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
# GPUs as SLURM sees them: a device file each, any will do. A job that asks for one is scheduled and
# gets CUDA_VISIBLE_DEVICES; torch finds no CUDA device behind it.
FAKE_GPUS = ("/dev/null", "/dev/zero", "/dev/full")
GPU_RULES = ("build", "benchmark", "accuracy", "decode", "decode_append", "decode_accuracy", "e2e")  # the profile's gpu_rules


# ----------------------------------------------------------------------------- the cluster


def _unavailable(reason: str):
    if os.environ.get("KVPACK_REQUIRE_SLURM", "") not in ("", "0"):
        pytest.fail(f"KVPACK_REQUIRE_SLURM is set, but {reason}")
    pytest.skip(reason)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _require_plugin() -> None:
    message = cluster.check_executor_plugin()
    if message:
        _unavailable(message)


def _ensure_slurm_installed() -> None:
    if all(shutil.which(b) for b in BINARIES):
        return
    if not shutil.which("apt-get"):
        _unavailable(f"SLURM is not installed and there is no apt-get to install {' '.join(APT_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=60",
               *APT_PACKAGES]
    errors = []
    # The package lists may be missing or stale: install, and only on failure update and retry.
    for step in ([install], [["apt-get", "update", "-q"], install]):
        try:
            for cmd in step:
                done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    errors.append(f"`{' '.join(cmd)}` exited {done.returncode}: {_tail(done.stderr, 5)}")
                    break
        except subprocess.TimeoutExpired as e:
            errors.append(f"`{' '.join(e.cmd)}` timed out after {e.timeout:.0f} s")
        if all(shutil.which(b) for b in BINARIES):
            return
    _unavailable(f"could not install {' '.join(APT_PACKAGES)} with apt-get (no network to the package mirror?): "
                 + " | ".join(errors))


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on localhost now (held together while chosen, so never the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, configured and logged under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        # Inside a job, snakemake-executor-plugin-slurm-jobstep (0.6.1) runs the rule through
        # `srun` with every SLURM_* variable but the job's identity removed, SLURM_CONF included,
        # and srun then finds no configuration. A site with /etc/slurm/slurm.conf never notices;
        # this cluster lives in a temp dir, so its jobs get an `srun` that puts SLURM_CONF back.
        bin_dir = root / "bin"
        bin_dir.mkdir()
        srun = bin_dir / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}"

    # -- clients
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        done = subprocess.run(cmd, check=False, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def job(self, jobid: str) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge)."""
        out = self.run("scontrol", "show", "job", "-o", str(jobid))
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", out))

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{_tail(path.read_text(errors='replace'), 20)}")
        return "\n".join(parts)

    # -- life cycle
    def start(self) -> None:
        munge = pwd.getpwnam("munge")
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir()
        mdir = self.root / "munge"
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        mdir.chmod(0o755)  # munged insists: execute for all on its socket's directory
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o600)
        socket_path = mdir / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                               f"--log-file={mdir / 'munged.log'}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--seed-file={mdir / 'munged.seed'}"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: socket_path.exists(), 15, "munged to create its socket")

        # The node as slurmd sees it ("NodeName=vm CPUs=2 Boards=1 ... RealMemory=..."), but with at
        # least 4 CPUs (config_overrides): the jobs mostly start Python, and 4 at once keep the test short.
        node_line = self.run("slurmd", "-C").splitlines()[0]
        self.node = re.search(r"NodeName=(\S+)", node_line).group(1)
        cpus = max(4, int(re.search(r"CPUs=(\d+)", node_line).group(1)))
        memory = re.search(r"RealMemory=(\d+)", node_line).group(1)
        r = self.root
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(f"""\
ClusterName=kvpacktest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{len(FAKE_GPUS)} State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.node} MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text("".join(f"NodeName={self.node} Name=gpu File={f}\n" for f in FAKE_GPUS))
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10).split()
                   == ["idle", "idle"], 60, "the node to be idle in both partitions")

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        with open(self.root / "log" / f"{name}.out", "w") as out:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, **kw)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:  # jobs first, so that no slurmstepd outlives the daemons
                ids = self.run("squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i", check=False, timeout=10).split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline and self.run(
                            "squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i", check=False, timeout=10).split():
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="session")
def slurm():
    if not sys.platform.startswith("linux"):
        pytest.skip("SLURM runs on Linux only")
    _require_plugin()
    if os.geteuid() != 0:
        _unavailable("starting SLURM daemons needs root (CI runs as root)")
    _ensure_slurm_installed()
    try:
        pwd.getpwnam("munge")
    except KeyError:
        _unavailable("the munge package did not create its user 'munge'")
    root = Path(tempfile.mkdtemp(prefix="kvpack-slurm-"))
    root.chmod(0o755)  # munged, running as user munge, must reach its socket below this
    cluster_ = SlurmCluster(root)
    try:
        try:
            cluster_.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _unavailable(f"a local SLURM did not come up: {e}\n{cluster_.logs()}")
        yield cluster_
    finally:
        cluster_.stop()
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- running the workflow

# Two tiny workloads, few repeats, no reference results: the whole DAG in seconds per job.
TINY = """\
grid:
  - {name: Tiny odd 3x5, T: 3, D: 5}
  - {name: Trivial Correctness Test, T: 256, D: 64}
dtypes: [float32]
benchmark: {warmup: 1, repeats: 2, cpu_repeats: 2, cpu_time_budget_s: 0.5, copy_bytes: 1048576}
reference_dirs: []
"""
# On the cluster: the repository's profile, plus what a cluster without accounting needs (squeue
# for job states) and every job's SLURM log kept. The plugin checks 5 s after a submission, then
# 15 s and 25 s later: these jobs (mostly Python starting) are seen done 20 s after they start.
SLURM_ARGS = ("--profile", str(PROFILE), "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs", "--latency-wait", "10")
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.MULTILINE)
NO_CUDA = "no CUDA device"  # kvpack.pipeline.environment.resolve_device's words for device 'cuda' without a GPU


def workdir(tmp_path: Path, name: str, **config) -> Path:
    d = tmp_path / name
    d.mkdir()
    extra = "".join(f"{k}: {v}\n" for k, v in config.items())
    (d / "tiny.yaml").write_text(TINY + extra)
    return d


def start_snakemake(wd: Path, *args: str, env: dict) -> subprocess.Popen:
    """snakemake on the repository's Snakefile, in ``wd``, with the default config + tiny.yaml."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(wd),
           "--configfile", str(ROOT / "config" / "config.yaml"), str(wd / "tiny.yaml"), *args]
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    with open(wd / "snakemake.out", "w") as out:
        return subprocess.Popen(cmd, cwd=wd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # snakemake cancels its SLURM jobs on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        rc = None
    wd = Path(proc.args[proc.args.index("--directory") + 1])
    out = (wd / "snakemake.out").read_text(errors="replace")
    assert rc is not None, f"snakemake did not finish within {timeout:.0f} s (a hang):\n{_tail(out, 60)}"
    return rc, out


def slurm_env(slurm: SlurmCluster, **settings: str) -> dict:
    profile_vars = ("KVPACK_CPU_PARTITION", "KVPACK_GPU_PARTITION", "KVPACK_SLURM_")  # the profile's, set here only
    env = {k: v for k, v in slurm.env.items() if not k.startswith(profile_vars)}
    env.update({"KVPACK_SLURM_MEM_MB": "1000", "KVPACK_SLURM_RUNTIME": "10", "KVPACK_SLURM_THREADS": "1", **settings})
    return env


def submitted_jobs(out: str) -> list[dict]:
    """The jobs snakemake submitted, from its output: rule, SLURM job id and SLURM log of each."""
    jobs = []
    for _, jobid, log in SUBMITTED.findall(out):
        rule = re.search(r"/rule_([^/]+)/", log).group(1)
        jobs.append({"rule": rule, "jobid": jobid, "log": Path(log)})
    return jobs


def job_stats(out: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (rule -> number of jobs), without the total."""
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_rows_match(ours: list[dict], theirs: list[dict], what: str, rel: float = 1e-9) -> None:
    """Equal row by row; numbers to ``rel`` (threads may reorder float64 sums), the rest exactly."""
    assert len(ours) == len(theirs), f"{what}: {len(ours)} rows here, {len(theirs)} in the local run"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys(), f"{what} row {i}: columns {sorted(a)} != {sorted(b)}"
        for key in a:
            x, y = a[key], b[key]
            try:
                fx, fy = float(x), float(y)
            except (TypeError, ValueError):
                assert x == y, f"{what} row {i}, {key}: {x!r} != {y!r}"
            else:
                assert fx == pytest.approx(fy, rel=rel, abs=1e-300, nan_ok=True), f"{what} row {i}, {key}: {x} != {y}"


# Deterministic given the config: compared value by value. The others hold timings (or verdicts and
# provenance that follow from them): compared by the columns that say which row is which.
DETERMINISTIC_TABLES = {"accuracy", "memory", "workloads", "paper", "paper_l2"}
ROW_IDENTITY = {"source", "device_slug", "device_name", "workload", "T", "D", "elements", "dtype", "impl", "family",
                "device", "hardware", "op", "granularity", "status", "skip_reason", "baseline", "claim_id", "text",
                "records", "cpu_model", "path"}


# ----------------------------------------------------------------------------- the tests (no cluster)


def test_missing_plugin_gets_an_install_hint(monkeypatch):
    real = cluster.importlib.util.find_spec
    monkeypatch.setattr(cluster.importlib.util, "find_spec",
                        lambda name, *a: None if name == cluster.PLUGIN_MODULE else real(name, *a))
    message = cluster.check_executor_plugin()
    assert 'pip install -e ".[cluster]"' in message and "invalid choice: 'slurm'" in message
    monkeypatch.setattr(cluster.importlib.util, "find_spec", lambda name, *a: object())
    assert cluster.check_executor_plugin() is None


@pytest.mark.parametrize("env,default_resources,set_resources", [
    ({}, [], []),
    ({"KVPACK_CPU_PARTITION": "all", "KVPACK_SLURM_ACCOUNT": "proj-1"},
     ["slurm_partition='all'", "slurm_account='proj-1'"],
     [f"{rule}:slurm_partition='all'" for rule in GPU_RULES]),
    ({"KVPACK_CPU_PARTITION": "short", "KVPACK_GPU_PARTITION": "h100"}, ["slurm_partition='short'"],
     [f"{rule}:slurm_partition='h100'" for rule in GPU_RULES]),
])
def test_profile_takes_site_settings_from_the_environment(monkeypatch, env, default_resources, set_resources):
    """No site in the profile: partitions and account come from the environment, unset ones are left out."""
    from snakemake.profiles import ProfileConfigFileParser

    for key in [k for k in os.environ if k.startswith("KVPACK_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with open(PROFILE / "config.yaml") as f:
        parsed = ProfileConfigFileParser().parse(f)
    assert parsed["executor"] == "slurm"
    assert parsed["set-threads"] == ["build=8", "benchmark=8", "accuracy=8"]
    assert parsed["default-resources"] == ["runtime=30", "mem_mb=8000", *default_resources]
    assert parsed.get("set-resources", []) == set_resources


def test_every_job_that_asks_for_a_gpu_goes_to_the_gpu_partition(tmp_path):
    """The profile routes GPU jobs by rule name: a dry run of a cuda run (all jobs, as planned on a
    submit host without a GPU) must put every job that asks for a GPU in KVPACK_GPU_PARTITION."""
    _require_plugin()  # the profile's `executor: slurm`
    wd = workdir(tmp_path, "dryrun", device="cuda", device_name="fakegpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPACK_", "SLURM_"))}
    env.update(KVPACK_CPU_PARTITION="cpu-part", KVPACK_GPU_PARTITION="gpu-part")
    rc, out = finish(start_snakemake(wd, "--profile", str(PROFILE), "--dry-run", "--forceall", env=env), timeout=120)
    assert rc == 0, _tail(out, 40)
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", out, re.MULTILINE)
    jobs = [(rule, res) for rule, res in jobs if rule != "all"]  # the target rule is no job on the cluster
    stats = job_stats(out)
    assert len(jobs) == sum(stats.values()) - stats.get("all", 0), out
    for rule, resources in jobs:
        partition = re.search(r"slurm_partition=(\S+?)(,|$)", resources).group(1)
        if rule in ("build", "benchmark", "accuracy"):
            assert "gpu=1" in resources, (rule, resources)
        if "gpu=1" in resources:
            assert partition == "gpu-part", f"rule {rule} asks for a GPU but goes to {partition}: add it to gpu_rules"


# ----------------------------------------------------------------------------- the tests (on the cluster)


def test_quick_pipeline_runs_as_slurm_jobs_and_matches_a_local_run(slurm, tmp_path):
    config = {"device": "cpu", "device_name": "kvpack-slurm-cpu"}
    on_slurm, local = workdir(tmp_path, "slurm", **config), workdir(tmp_path, "local", **config)
    t0 = time.monotonic()
    # The two runs side by side: their timings are not compared, only what they computed.
    # Up to the tables (what is compared); figures and the report only draw them.
    slurm_run = start_snakemake(on_slurm, *SLURM_ARGS, "tables", env=slurm_env(slurm, KVPACK_CPU_PARTITION="cpu"))
    local_run = start_snakemake(local, "--cores", "2", "tables", env=dict(os.environ))
    rc, out = finish(slurm_run)
    assert rc == 0, _tail(out, 80) + "\n" + slurm.logs()
    local_rc, local_out = finish(local_run)
    assert local_rc == 0, _tail(local_out, 80)
    print(f"SLURM run and local run, side by side: {time.monotonic() - t0:.0f} s")

    # Every job of the DAG but the target-only rule 'all' was a SLURM job, with its log named by its id.
    jobs = submitted_jobs(out)
    stats = job_stats(local_out)
    stats.pop("all", None)
    assert {r: sum(j["rule"] == r for j in jobs) for r in {j["rule"] for j in jobs}} == stats, out
    assert stats.get("build") == 1 and stats.get("benchmark") == 2 and stats.get("accuracy") == 2
    for job in jobs:
        info = slurm.job(job["jobid"])
        assert info["JobState"] == "COMPLETED", (job, info)
        assert info["Partition"] == "cpu", (job, info)  # KVPACK_CPU_PARTITION, and no GPU partition set
        assert "gpu" not in info.get("TRES", "") + info.get("TresPerJob", ""), (job, info)  # device cpu: no GPU asked
        assert Path(info["WorkDir"]) == on_slurm
        log = job["log"]
        assert log.is_relative_to(on_slurm / ".snakemake" / "slurm_logs"), log
        assert log.name == f"{job['jobid']}.log" and Path(info["StdOut"]) == log, (job, info)
        text = log.read_text()
        assert f"rule {job['rule']}:" in text and "Finished jobid" in text, text
    ctld = (slurm.root / "log" / "slurmctld.log").read_text()
    assert all(f"_job_complete: JobId={j['jobid']} done" in ctld for j in jobs)

    # What the jobs computed equals the local run's: the raw accuracy records, then the tables.
    for path in sorted((local / "results").glob("*/accuracy/*.json")):
        ours = json.loads((on_slurm / path.relative_to(local)).read_text())
        theirs = json.loads(path.read_text())
        assert ours["workload"] == theirs["workload"]
        assert_rows_match([{k: str(v) for k, v in r.items()} for r in ours["rows"]],
                          [{k: str(v) for k, v in r.items()} for r in theirs["rows"]], f"{path.name} rows")
    tables = sorted(p.name for p in (local / "results" / "tables").glob("*.csv"))
    assert tables == sorted(p.name for p in (on_slurm / "results" / "tables").glob("*.csv"))
    for name in tables:
        ours, theirs = read_csv(on_slurm / "results" / "tables" / name), read_csv(local / "results" / "tables" / name)
        assert (ours[0].keys() if ours else None) == (theirs[0].keys() if theirs else None), name
        if Path(name).stem in DETERMINISTIC_TABLES:
            assert_rows_match(ours, theirs, name)
        else:
            assert_rows_match([{c: v for c, v in r.items() if c in ROW_IDENTITY} for r in ours],
                              [{c: v for c, v in r.items() if c in ROW_IDENTITY} for r in theirs], f"{name} (row keys)")
    assert tables, "the tables rule wrote no CSV"


def test_gpu_jobs_ask_for_a_gpu_and_fail_clearly_on_a_node_without_cuda(slurm, tmp_path):
    """device cuda, planned on a submit host without a GPU (device_name set): GPU jobs go to the GPU
    partition with one GPU each; on this node the 'GPU' is /dev/null, and each job must fail with
    kvpack's message, not hang and not run on the CPU under the GPU's name."""
    env = slurm_env(slurm, KVPACK_CPU_PARTITION="cpu", KVPACK_GPU_PARTITION="gpu")
    config = {"device": "cuda", "device_name": "fakegpu"}
    # The build asks for the GPU (it compiles the CUDA half where it sees one) ...
    build_wd = workdir(tmp_path, "build", **config)
    build_run = start_snakemake(build_wd, *SLURM_ARGS, "results/fakegpu/build.json", env=env)
    # ... and so do the benchmark and accuracy jobs, run here with the build taken as done.
    jobs_wd = workdir(tmp_path, "jobs", **config)
    (jobs_wd / "results" / "fakegpu").mkdir(parents=True)
    (jobs_wd / "results" / "fakegpu" / "build.json").write_text('{"note": "placeholder: the build is not under test"}')
    targets = [f"results/fakegpu/{stage}/3x5_float32.json" for stage in ("benchmark", "accuracy")]
    jobs_run = start_snakemake(jobs_wd, *SLURM_ARGS, "--rerun-triggers", "mtime", "--keep-going", *targets, env=env)
    for wd, proc, rules in ((build_wd, build_run, {"build"}), (jobs_wd, jobs_run, {"benchmark", "accuracy"})):
        rc, out = finish(proc)
        assert rc != 0, _tail(out, 60)
        jobs = submitted_jobs(out)
        assert sorted(j["rule"] for j in jobs) == sorted(rules), out
        for job in jobs:
            info = slurm.job(job["jobid"])
            assert info["Partition"] == "gpu", (job, info)
            assert "gres:gpu:1" in info.get("TresPerJob", "") or "gres/gpu=1" in info.get("TRES", ""), (job, info)
            assert info["JobState"] == "FAILED", (job, info)
            assert job["log"].is_file(), job
            # The reason, in the job's logs: its SLURM log, or the rule's log that the SLURM log names.
            text = job["log"].read_text()
            rule_logs = [wd / p for p in re.findall(r"log: (logs/\S+)", text)]
            found = NO_CUDA in text or any(p.is_file() and NO_CUDA in p.read_text() for p in rule_logs)
            assert found, f"{NO_CUDA!r} not in {job['log']} nor in {rule_logs}:\n{_tail(text, 40)}"
        # ... and in snakemake's own output (the profile's show-failed-logs), with the GPU the job was given.
        assert NO_CUDA in out and re.search(r"CUDA_VISIBLE_DEVICES=\d", out), _tail(out, 60)
        results = wd / "results" / "fakegpu"
        assert not any(results.glob("benchmark/*.json")) and not any(results.glob("accuracy/*.json"))


def test_an_unknown_partition_fails_with_slurms_message(slurm, tmp_path):
    wd = workdir(tmp_path, "badpartition", device="cpu", device_name="kvpack-slurm-cpu")
    env = slurm_env(slurm, KVPACK_CPU_PARTITION="no-such-partition")
    rc, out = finish(start_snakemake(wd, *SLURM_ARGS, "results/kvpack-slurm-cpu/build.json", env=env), timeout=120)
    assert rc != 0
    assert "invalid partition specified: no-such-partition" in out, _tail(out, 40)  # sbatch's words
    assert not submitted_jobs(out)
