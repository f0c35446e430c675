"""Helpers for tests that run real jobs through launch/*.sh and kill them: processes found by a
marker in their environment, jobs in their own process groups, waits that always end, and two
"nodes" on this machine (tests/test_multinode.py, tests/test_orphans.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MARKER_ENV = "SPARSEMILL_TEST_MARKER"  # inherited by the launcher, torchrun and every worker
NODE_ENV = "SPARSEMILL_TEST_NODE"
STEP_TOKENS = 256
STEPS = 64  # an uninterrupted run; interrupted ones get a budget they never reach (see tiny_args)
# variables of the caller's shell (or a SLURM job) that the launch scripts read
SCRIPT_VARS = ("NPROC_PER_NODE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NNODES", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "RDZV_ID", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_CPUS_PER_TASK")


def tiny_args(run_dir: Path, text_dir: Path, steps: int = STEPS, extra=()) -> list[str]:
    """configs/debug.yaml cut to seconds of training, checkpoints every 4 steps, an evaluation
    every 8. No learning-rate decay, so that a run given a budget of 10M tokens (to be killed
    long before its end) follows the same trajectory as one of `steps` steps."""
    return ["configs/debug.yaml", f"run_dir={run_dir}", f"data.paths=[{text_dir}]",
            f"train.total_tokens={steps * STEP_TOKENS}", f"train.batch_size={STEP_TOKENS}", "train.buffer_tokens=1024",
            "train.init_tokens=512", "train.decay_fraction=0", "train.checkpoint_every=4", "train.keep_checkpoints=3",
            "eval.tokens=512", "eval.splice_tokens=128", "eval.every_steps=8", "log.tensorboard=false",
            "dist.timeout_s=20", "--quiet", *extra]


def endless(run_dir: Path, text_dir: Path, extra=()) -> list[str]:
    return tiny_args(run_dir, text_dir, 10_000_000 // STEP_TOKENS, extra)


def script_env(marker: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1",  # a crash prints every thread's stack
               PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    env[MARKER_ENV] = marker
    env.update({k: str(v) for k, v in extra.items()})
    return env


def new_marker() -> str:
    return uuid.uuid4().hex


def marked_pids(marker: str, node: int | None = None) -> list[int]:
    """Live (not zombie) processes whose environment carries the marker (and node)."""
    wanted = [f"{MARKER_ENV}={marker}".encode()] + ([f"{NODE_ENV}={node}".encode()] if node is not None else [])
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(w in environ for w in wanted):
            found.append(int(proc.name))
    return found


def env_of(pid: int, name: str) -> str | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        key, _, value = item.decode(errors="replace").partition("=")
        if key == name:
            return value
    return None


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    """condition()'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


class Job:
    """One launcher in its own process group (as a shell would start it), output to a file."""

    def __init__(self, argv: list[str], log: Path, env: dict):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_group(self) -> None:
        """kill -9 of the launcher's process group: the script and torchrun (the workers have
        their own sessions: they must end by themselves)."""
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log = self.text()[-3000:]
            raise AssertionError(f"{self.log.name}: still running after {timeout:g} s:\n{log}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill_group()
            self.proc.wait(timeout=30)


def wait_running(jobs: list[Job], condition, timeout: float, what: str):
    """wait_for, failing at once (with the log) if a job ends first."""
    def check():
        for job in jobs:
            if job.proc.poll() is not None:
                raise AssertionError(f"{job.log.name} ended (exit code {job.proc.returncode}) before {what}:\n"
                                     f"{job.text()[-3000:]}")
        return condition()

    return wait_for(check, timeout, what)


def one_node(args: list[str], log: Path, marker: str, nproc: int = 2, **env) -> Job:
    return Job(["bash", "launch/single_node.sh", "--nproc_per_node", str(nproc), *args], log, script_env(marker, **env))


def finish(jobs: list[Job], timeout: float = 400) -> None:
    """Wait for every job of an uninterrupted run; each must succeed."""
    for job in jobs:
        assert job.wait(timeout) == 0, f"{job.log.name} failed:\n{job.text()[-4000:]}"


def kill_marked(marker: str) -> None:
    """Cleanup after a failed test: nothing it started may outlive it."""
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def latest_step(run_dir: Path) -> int | None:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip()[5:])
    except (OSError, ValueError):
        return None


def saving(run_dir: Path, after_step: int, since: float, file: str | None = None) -> bool:
    """A save of a step after `after_step` is being written: its temporary folder holds a file
    (`file`, or any) written after `since` (time.time())."""
    for tmp in (run_dir / "checkpoints").glob(".tmp_step_*"):
        try:
            files = [tmp / file] if file else list(tmp.iterdir())
            if int(tmp.name[len(".tmp_step_"):]) > after_step and any(
                    f.exists() and f.stat().st_mtime > since for f in files):
                return True
        except OSError:  # published (renamed) meanwhile
            continue
    return False


def final_weights(run_dir: Path) -> dict:
    """The newest checkpoint's shared tensors of every SAE (weights, dead-latent counters),
    keyed "<sae>/<tensor>". The optimizer's moments are left out: ddp saves them whole with the
    weights, ZeRO in per-rank pieces, so they are compared where the layout is known
    (tests/test_distributed.py)."""
    folder = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    names = json.loads((folder / "state.json").read_text())["saes"]
    return {f"{n}/{k}": v for n in names for k, v in load_file(str(folder / f"{n}.safetensors")).items()
            if not k.startswith("optim.")}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- two nodes


class Nodes:
    """Two "nodes" on this machine. As root with iproute2: each its own network namespace (a
    veth pair between them, 10.77.0.1 and .2), its own host name (a UTS namespace) and its own
    /etc/hosts naming both (`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts), so
    torchrun's rendezvous and gloo reach each other only through the veth, as nodes would.
    Otherwise both on loopback (`isolated` is False; the test says so)."""

    HOSTS = ("sm-node0", "sm-node1")
    ADDRS = ("10.77.0.1", "10.77.0.2")

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.netns = (f"smn{tag}a", f"smn{tag}b")
        self._made: list[str] = []
        self.isolated = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("unshare") is not None
        self.why = "" if self.isolated else "not root, or no ip/unshare: both nodes on 127.0.0.1"
        if self.isolated:
            try:
                self._create(f"smv{tag}a", f"smv{tag}b")
            except (subprocess.CalledProcessError, OSError) as err:
                self.close()
                self.isolated, self.why = False, f"could not create network namespaces ({err}): both nodes on 127.0.0.1"
        self.endpoint = f"{self.HOSTS[0]}:29500" if self.isolated else f"127.0.0.1:{free_port()}"

    def _create(self, veth_a: str, veth_b: str) -> None:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

        for ns in self.netns:
            ip("netns", "add", ns)
            self._made.append(ns)
        ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.ADDRS, self.HOSTS))
        for ns, veth, addr in zip(self.netns, (veth_a, veth_b), self.ADDRS):
            ip("link", "set", veth, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts)

    def command(self, node: int, argv: list[str]) -> list[str]:
        """argv run on `node` (with its network and host name)."""
        if not self.isolated:
            return argv
        return ["ip", "netns", "exec", self.netns[node], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.HOSTS[node], *argv]

    def launch(self, node: int, args: list[str], log: Path, marker: str, nproc: int = 1, **env) -> Job:
        argv = ["bash", "launch/multi_node.sh", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                str(nproc), "--rdzv_endpoint", self.endpoint, "--rdzv_id", marker[:8], *args]
        return Job(self.command(node, argv), log, script_env(marker, **{NODE_ENV: node, **env}))

    def close(self) -> None:
        for ns in self._made:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def torchrun_train(nproc: int, config: Path, timeout: int = 300) -> str:
    """`sparsemill train CONFIG` under torchrun on this machine (gloo); its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "framework", "train", str(config), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def resumable_copy(config: Path, name: str, drop_step: int) -> Path:
    """A copy of CONFIG's finished run without its checkpoint of `drop_step` (so training resumes
    from the one before), and a config beside CONFIG that trains it: that config's path."""
    import yaml  # noqa: PLC0415

    cfg = yaml.safe_load(config.read_text())
    again = Path(cfg["run_dir"]).parent / name
    shutil.copytree(cfg["run_dir"], again)
    shutil.rmtree(again / "checkpoints" / f"step_{drop_step:08d}")
    cfg["run_dir"] = str(again)
    path = config.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_config(root: Path, name: str, cfg: dict) -> Path:
    """cfg as ROOT/NAME.yaml: its path."""
    import yaml  # noqa: PLC0415

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def saved_tensors(run: Path, step: int, sae: str) -> dict:
    """The tensors SAE's checkpoint of `step` holds (weights, counters)."""
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / f"{sae}.safetensors"))
