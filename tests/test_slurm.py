"""The slurm/ scripts on a real, local SLURM cluster (Debian slurm-wlm + munge, one node).

The module fixture installs slurm-wlm and munge with apt-get when missing (root only), writes a
slurm.conf into a temporary folder (own ports, state, spool, munge socket and key, so it touches
nothing system-wide), starts munged, slurmctld and slurmd in the foreground as child processes,
and stops them by pid at teardown, also when a test fails. Every wait is bounded.

What runs (CPU mode: --gpus-per-node=0, 2 gloo processes under one torchrun per node):
  1. slurm/multi_node.sbatch through slurm/submit.sh, uninterrupted: COMPLETED, checkpoint and
     SAELens exports valid. This is the reference run.
  2. the same job and config, preempted twice: once with `scancel --signal=USR1 JOBID` (the steps
     only: what `--signal=USR1@<seconds>` does before the time limit), once with
     `scancel --signal=USR1 --batch JOBID` (the batch shell only, which forwards it). Each time the
     run checkpoints, exits 75, the job requeues itself, and the next attempt resumes from that
     checkpoint's step; the job ends COMPLETED with the reference run's step count.
  3. slurm/sweep.sbatch as a 2-task array job: one run directory per task.
Job ids, state transitions and wall times are printed (run pytest with -s to see them live).

Also: the preempted, requeued and resumed job ends with weights bitwise equal to the
uninterrupted reference run's (test_resumed_weights_equal_uninterrupted_run).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
SCRIPT_VARS = ("NPROC_PER_NODE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NNODES", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "RDZV_ID", "RDZV_HOST", "RDZV_PORT", "NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "TIME",
               "PARTITION", "ACCOUNT", "QOS", "JOB_NAME", "SIGNAL_SECONDS", "ARRAY_PARALLEL", "CPU", "SBATCH_EXTRA",
               "SPARSEMILL_ROOT", "MAX_REQUEUES")
SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
EVIDENCE: list[str] = []  # every line printed so far
CAPTURE: list = []  # pytest's capture manager: evidence goes to the terminal even without -s


def say(msg: str) -> None:
    line = f"[slurm-test {time.strftime('%H:%M:%S')}] {msg}"
    EVIDENCE.append(line)
    if CAPTURE:
        with CAPTURE[0].global_and_fixture_disabled():
            print(line, flush=True)
    else:
        print(line, flush=True)


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def _ensure_slurm() -> str | None:
    """None when slurm and munge are usable, else the reason to skip."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"SLURM binaries {missing} missing and not root: cannot apt-get install slurm-wlm munge"
    if _which("apt-get") is None:
        return f"SLURM binaries {missing} missing and apt-get unavailable"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            return f"'{' '.join(cmd)}' timed out"
        if out.returncode != 0:
            return f"'{' '.join(cmd)}' failed (no network or apt sources?): {out.stderr.strip()[-300:]}"
    missing = [b for b in BINARIES if _which(b) is None]
    return f"still missing after apt-get install: {missing}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    env: dict
    procs: dict = field(default_factory=dict)

    def run(self, *cmd, timeout=60, check=True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=self.env, timeout=timeout,
                             cwd=ROOT)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def submit(self, kind: str, *args, log: str, **env) -> str:
        environ = dict(self.env, SBATCH_OUTPUT=str(self.folder / "logs" / log), **{k: str(v) for k, v in env.items()})
        out = subprocess.run(["bash", str(ROOT / "slurm" / "submit.sh"), kind, *map(str, args), "--parsable"],
                             capture_output=True, text=True, env=environ, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        say(f"submitted job {job}: {out.stderr.strip()}")
        return job

    def jobs(self, job: str) -> list[dict]:
        """`scontrol show job -o` records (several for an array job)."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False)
        recs = []
        for line in out.stdout.splitlines():
            recs.append(dict(re.findall(r"(\w+)=(\S*)", line)))
        return recs

    def job(self, job: str) -> dict:
        recs = self.jobs(job)
        assert recs, f"job {job} unknown to slurmctld"
        return recs[0]

    def log_tail(self, name: str, n: int = 4000) -> str:
        path = self.folder / "logs" / name
        return path.read_text(errors="replace")[-n:] if path.exists() else f"(no {path})"


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_for(cluster: Cluster, job: str, cond, timeout: float, what: str, t0: float, log: str = "") -> dict:
    """Poll the job until cond(record) holds; print every state change; fail after timeout."""
    deadline, last, rec = time.time() + timeout, None, {}
    while time.time() < deadline:
        rec = cluster.job(job)
        key = (rec.get("JobState"), rec.get("Restarts"), rec.get("Reason"))
        if key != last:
            say(f"  t={time.time() - t0:6.1f}s job {job}: JobState={key[0]} Restarts={key[1]} Reason={key[2]}")
            last = key
        if cond(rec):
            return rec
        if rec.get("JobState") in FINAL and not cond(rec):
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job}: waited {timeout:.0f} s for {what}; last record {rec}\n--- log:\n"
                         f"{cluster.log_tail(log) if log else ''}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pytestconfig):
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        CAPTURE[:] = [capman]
    reason = _ensure_slurm()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("a private slurmctld/slurmd with SlurmUser=root needs root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "logs", "daemon_logs"):
        (d / sub).mkdir()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = d / "munge.sock"
    ctld_port, slurmd_port = _free_port(), _free_port()
    (d / "plugstack.conf").write_text("")
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=sparsemilltest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket={sock},cred_expire=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/daemon_logs/slurmctld.log
SlurmdLogFile={d}/daemon_logs/slurmd.log
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
MailProg=/bin/true
FirstJobId={random.randint(1000, 19000)}
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(SLURM_CONF=str(conf), PYTHON=sys.executable, PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH,
               HF_HUB_OFFLINE="1")
    c = Cluster(d, env)
    t0 = time.time()
    try:
        daemons = {
            "munged": [_which("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                       f"--pid-file={d}/munged.pid", f"--log-file={d}/daemon_logs/munged.log",
                       f"--seed-file={d}/munged.seed"],
            "slurmctld": [_which("slurmctld"), "-D", "-f", str(conf)],
            "slurmd": [_which("slurmd"), "-D", "-f", str(conf)],
        }
        for name, cmd in daemons.items():
            log = open(d / "daemon_logs" / f"{name}.out", "w")
            c.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if name == "munged":
                deadline = time.time() + 15
                while not sock.exists() and time.time() < deadline:
                    time.sleep(0.1)
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            for name, p in c.procs.items():
                assert p.poll() is None, f"{name} exited ({p.returncode}): " + \
                    (d / "daemon_logs" / f"{name}.out").read_text()[-2000:]
            out = c.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            state = out.stdout.strip()
            if out.returncode == 0 and state in ("idle", "mix", "alloc"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"node not idle after 60 s (sinfo: {state!r}); slurmctld log:\n"
                                 + (d / "daemon_logs" / "slurmctld.log").read_text()[-3000:])
        version = c.run("sinfo", "--version").stdout.strip()
        say(f"{version} up in {time.time() - t0:.1f} s: node {host}, {os.cpu_count()} CPUs, conf {conf}, "
            f"pids " + ", ".join(f"{n}={p.pid}" for n, p in c.procs.items()))
        yield c
    finally:
        _teardown(c)
        say(f"cluster stopped; module wall time {time.time() - t0:.1f} s")


def _teardown(c: Cluster) -> None:
    if "slurmctld" in c.procs and c.procs["slurmctld"].poll() is None:
        out = c.run("squeue", "-h", "-o", "%A", check=False)
        jobs = sorted(set(out.stdout.split()))
        if jobs:
            say(f"teardown: cancelling jobs {jobs}")
            c.run("scancel", *jobs, check=False)
            deadline = time.time() + 40
            while time.time() < deadline and c.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):  # by pid: the processes this fixture started
        p = c.procs.get(name)
        if p is None or p.poll() is not None:
            continue
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


# --------------------------------------------------------------------------- helpers


def _overrides(run_dir: Path, text_dir: Path) -> list[str]:
    # 200 steps of 512 tokens with a checkpoint every 10: long enough to be signalled twice
    return ["configs/debug.yaml", f"run_dir={run_dir}", f"data.paths=[{text_dir}]", "train.total_tokens=102400",
            "train.batch_size=512", "train.buffer_tokens=2048", "train.init_tokens=1024", "train.checkpoint_every=10",
            "eval.tokens=1024", "eval.splice_tokens=256", "--quiet"]


STEPS = 102400 // 512


def _check_outputs(run_dir: Path, steps: int, world: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == world, summary
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] == steps, state
    for name in ("resid2", "mlp1_transcoder"):
        cfg = json.loads((run_dir / "export" / name / "cfg.json").read_text())
        weights = load_file(str(run_dir / "export" / name / "sae_weights.safetensors"))
        assert weights["W_dec"].shape == (cfg["d_sae"], cfg["d_in"])
        assert all(bool(w.isfinite().all()) for w in weights.values())
        assert cfg["metadata"]["training_tokens"] == summary["tokens"]
    assert set(json.loads((run_dir / "eval.json").read_text())) == {"resid2", "mlp1_transcoder"}
    return summary


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return json.loads((run_dir / "checkpoints" / pointer.read_text().strip() / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _wait_checkpoint_after(cluster, job, run_dir, step, timeout, t0, log) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = _latest_step(run_dir)
        if s > step:
            return s
        rec = cluster.job(job)
        assert rec["JobState"] not in FINAL, f"job ended before a checkpoint after step {step}: {rec}"
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint after step {step} within {timeout} s\n{cluster.log_tail(log)}")


# --------------------------------------------------------------------------- jobs (module fixtures: any test
# that needs a job's run directory asks for it, so every test also runs alone)


@pytest.fixture(scope="module")
def reference_job(cluster, tmp_path_factory, text_dir) -> Path:
    """An uninterrupted 2-task job; its run directory."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.time()
    job = cluster.submit("multi", *_overrides(run_dir, text_dir), log="%x-%j.log", CPU=1, NODES=1,
                         JOB_NAME="sm-reference")
    log = f"sm-reference-{job}.log"
    rec = wait_for(cluster, job, lambda r: r["JobState"] in FINAL, 600, "the job to end", t0, log)
    text = cluster.log_tail(log, 100_000)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text[-4000:]
    summary = _check_outputs(run_dir, STEPS, world=2)
    assert "multi_node.sh: node 0 of 1" in text and "step exited with code 0" in text
    say(f"reference job {job}: {rec['JobState']} exit {rec['ExitCode']} restarts {rec['Restarts']}, "
        f"{summary['steps']} steps, wall {time.time() - t0:.1f} s (RunTime {rec.get('RunTime')})")
    return run_dir


@pytest.fixture(scope="module")
def preempted_job(cluster, tmp_path_factory, text_dir) -> Path:
    """The same job signalled twice (USR1 to the steps, then to the batch shell): it
    checkpoints, exits 75, is requeued and resumes each time; its run directory."""
    run_dir = tmp_path_factory.mktemp("preempted") / "run"
    t0 = time.time()
    job = cluster.submit("multi", *_overrides(run_dir, text_dir), log="%x-%j.log", CPU=1, NODES=1,
                         JOB_NAME="sm-preempt")
    log = f"sm-preempt-{job}.log"
    stops = []
    for attempt, scancel in enumerate((["scancel", "--signal=USR1"], ["scancel", "--signal=USR1", "--batch"])):
        wait_for(cluster, job, lambda r, a=attempt: r["JobState"] == "RUNNING" and int(r["Restarts"]) == a, 300,
                 f"attempt {attempt + 1} to run", t0, log)
        seen = _wait_checkpoint_after(cluster, job, run_dir, stops[-1] if stops else 0, 300, t0, log)
        cluster.run(*scancel, job)
        say(f"  t={time.time() - t0:6.1f}s attempt {attempt + 1} at checkpoint step {seen}: {' '.join(scancel)} {job}")
        wait_for(cluster, job, lambda r, a=attempt: int(r["Restarts"]) == a + 1, 300, "the requeue", t0, log)
        text = cluster.log_tail(log, 1_000_000)
        found = re.findall(r"preempted: stopped by signal 10 at step (\d+)", text)
        assert found, text[-4000:]
        stops.append(int(found[-1]))
        say(f"  attempt {attempt + 1} checkpointed at step {stops[-1]} and exited 75; job requeued")
    rec = wait_for(cluster, job, lambda r: r["JobState"] in FINAL, 600, "the job to end", t0, log)
    text = cluster.log_tail(log, 1_000_000)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "2", text[-4000:]
    resumed = [int(s) for s in re.findall(r"resuming from \S+step_(\d+)", text)]
    say(f"  stops at steps {stops}; resumed from steps {sorted(set(resumed))}")
    assert sorted(set(resumed)) == stops, text[-4000:]  # each attempt resumed exactly where the previous stopped
    assert 0 < stops[0] < stops[1] < STEPS
    assert text.count("step exited with code 75") == 2 and text.count("preempted: requeueing job") == 2
    # the first signal reached the steps only, the second (--batch) went through the batch shell
    assert text.count("batch shell got SIGUSR1: forwarding to the step") == 1
    assert text.count("attempt 3 (restart count 2)") == 1
    summary = _check_outputs(run_dir, STEPS, world=2)
    say(f"preempted job {job}: {rec['JobState']} exit {rec['ExitCode']} restarts {rec['Restarts']}, final step "
        f"{summary['steps']} (uninterrupted: {STEPS}), wall {time.time() - t0:.1f} s")
    return run_dir


# --------------------------------------------------------------------------- tests


def test_multi_node_job_trains_and_exports(reference_job):
    _check_outputs(reference_job, STEPS, world=2)


def test_preempted_job_requeues_and_resumes(preempted_job):
    _check_outputs(preempted_job, STEPS, world=2)


def _weight_diff(a: Path, b: Path) -> dict:
    out = {}
    for name in ("resid2", "mlp1_transcoder"):
        wa = load_file(str(a / "export" / name / "sae_weights.safetensors"))
        wb = load_file(str(b / "export" / name / "sae_weights.safetensors"))
        out[name] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return out


def test_resumed_weights_equal_uninterrupted_run(reference_job, preempted_job):
    diff = _weight_diff(reference_job, preempted_job)
    say(f"  max |weight difference| of the preempted job vs the uninterrupted one: {diff}")
    assert all(v == 0.0 for v in diff.values()), f"max |difference| per SAE: {diff}"


def test_sweep_array_job(cluster, tmp_path_factory, text_dir):
    root = tmp_path_factory.mktemp("sweep")
    sweep = root / "k.txt"
    sweep.write_text("# two tiny runs\nconfigs/debug.yaml saes.0.k=4\n\nconfigs/debug.yaml saes.0.k=16\n")
    common = [f"data.paths=[{text_dir}]", "train.total_tokens=4096", "train.batch_size=256", "train.buffer_tokens=1024",
              "train.init_tokens=512", "eval.tokens=512", "eval.splice_tokens=128", "--quiet"]
    t0 = time.time()
    job = cluster.submit("sweep", sweep, *common, log="%x-%A_%a.log", CPU=1, NPROC_PER_NODE=1,
                         JOB_NAME="sm-sweep", SWEEP_RUN_ROOT=root / "runs")
    deadline = time.time() + 600
    recs = []
    while time.time() < deadline:
        recs = cluster.jobs(job)
        if len(recs) == 2 and all(r.get("JobState") in FINAL for r in recs):
            break
        time.sleep(1)
    states = {r.get("ArrayTaskId"): (r.get("JobId"), r.get("JobState"), r.get("ExitCode")) for r in recs}
    say(f"sweep array job {job}: tasks {states}, wall {time.time() - t0:.1f} s")
    logs = {i: cluster.log_tail(f"sm-sweep-{job}_{i}.log") for i in (0, 1)}
    assert len(recs) == 2 and all(s[1] == "COMPLETED" for s in states.values()), logs
    for i, k in ((0, 4), (1, 16)):
        run_dir = root / "runs" / "k" / str(i)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 16 and summary["world_size"] == 1
        assert json.loads((run_dir / "export" / "resid2" / "cfg.json").read_text())["k"] == k
        assert f"sweep {sweep} line {i}: configs/debug.yaml saes.0.k={k}" in logs[i]
