"""Launch scripts (launch/*.sh, slurm/submit.sh): the exact command each prints with --dry-run,
shellcheck, real CPU runs of debug.sh and single_node.sh (2 processes, with a preemption), and
the config presets in configs/ loading offline."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from framework.config import load_config
from framework.preemption import PREEMPTED_EXIT_CODE
from framework.studies import STUDY_COMMANDS
from framework.study_config import load_study_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
HANDLED = "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"
# variables the scripts read: cleared so the caller's shell (or a SLURM job) cannot leak in
SCRIPT_VARS = ("NPROC_PER_NODE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NNODES", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "RDZV_ID", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_CPUS_PER_TASK",
               "NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "TIME", "PARTITION", "ACCOUNT", "QOS", "JOB_NAME",
               "SIGNAL_SECONDS", "ARRAY_PARALLEL", "CPU", "SBATCH_EXTRA")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env["PYTHON"] = PY
    env["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(script: str, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


def _dry(script: str, *args, **env) -> list[str]:
    out = _run(script, "--dry-run", *args, env=_env(**env))
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout.strip() or out.stderr.strip())


def _threads(n_proc: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"OMP_NUM_THREADS={max(1, cores // n_proc)}"


# --------------------------------------------------------------------------- dry runs


def test_debug_dry_run():
    assert _dry("launch/debug.sh", "configs/debug.yaml", "saes.0.k=16", "--quiet") == [
        PY, "-m", "framework", "train", "configs/debug.yaml", "saes.0.k=16", "--quiet"]


def test_single_node_dry_run_cpu_defaults_to_two_processes():
    cmd = _dry("launch/single_node.sh", "configs/debug.yaml", "train.total_tokens=4096", "run_dir=/tmp/a b",
               CUDA_VISIBLE_DEVICES="")
    assert cmd == [_threads(2), *TORCHRUN, "--standalone", "--nnodes=1", "--nproc-per-node=2", HANDLED,
                   "-m", "framework", "train", "configs/debug.yaml", "train.total_tokens=4096", "run_dir=/tmp/a b"]


def test_single_node_dry_run_gpu_count_and_overrides():
    # one process per visible GPU
    cmd = _dry("launch/single_node.sh", "configs/gpt2_small.yaml", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert "--nproc-per-node=4" in cmd and cmd[-4:] == ["-m", "framework", "train", "configs/gpt2_small.yaml"]
    # the flag beats the environment, the environment beats detection; options after the config pass through
    cmd = _dry("launch/single_node.sh", "--nproc_per_node", "3", "configs/debug.yaml", "--no-resume", "saes.0.k=4",
               CUDA_VISIBLE_DEVICES="0,1", NPROC_PER_NODE=5)
    assert "--nproc-per-node=3" in cmd and cmd[-3:] == ["configs/debug.yaml", "--no-resume", "saes.0.k=4"]
    assert "--nproc-per-node=5" in _dry("launch/single_node.sh", "configs/debug.yaml", NPROC_PER_NODE=5)
    assert _dry("launch/single_node.sh", "--nproc-per-node=6", "configs/debug.yaml", OMP_NUM_THREADS=3)[0] \
        == "OMP_NUM_THREADS=3"


def test_multi_node_dry_run_from_arguments():
    cmd = _dry("launch/multi_node.sh", "--nnodes", "4", "--node_rank", "2", "--rdzv_endpoint", "node17:29400",
               "--nproc_per_node", "8", "configs/llama3_8b_all_layers.yaml", "train.total_tokens=1000")
    assert cmd == [_threads(8), *TORCHRUN, "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                   "--rdzv-endpoint=node17:29400", "--rdzv-id=sparsemill", "--rdzv-conf=is_host=false", HANDLED,
                   "-m", "framework", "train", "configs/llama3_8b_all_layers.yaml", "train.total_tokens=1000"]


def test_multi_node_dry_run_from_environment_and_slurm():
    cmd = _dry("launch/multi_node.sh", "configs/debug.yaml", MASTER_ADDR="10.0.0.1", MASTER_PORT=1234, NNODES=2,
               NODE_RANK=0, CUDA_VISIBLE_DEVICES="0,1", RDZV_ID="run7")
    assert {"--nnodes=2", "--nproc-per-node=2", "--rdzv-endpoint=10.0.0.1:1234", "--rdzv-id=run7",
            "--rdzv-conf=is_host=true"} <= set(cmd)
    # inside a SLURM job: nodes, node rank and rendezvous id from SLURM; MASTER_PORT defaults to 29500
    cmd = _dry("launch/multi_node.sh", "configs/debug.yaml", MASTER_ADDR="gpu001", SLURM_JOB_NUM_NODES=3,
               SLURM_NODEID=1, SLURM_JOB_ID=4242, CUDA_VISIBLE_DEVICES="")
    assert {"--nnodes=3", "--nproc-per-node=2", "--rdzv-endpoint=gpu001:29500", "--rdzv-id=4242",
            "--rdzv-conf=is_host=false"} <= set(cmd)
    # arguments beat the environment
    cmd = _dry("launch/multi_node.sh", "--nnodes=2", "--node-rank=1", "--rdzv-endpoint=h:1", "configs/debug.yaml",
               MASTER_ADDR="x", MASTER_PORT=2, NNODES=9, NODE_RANK=0)
    assert {"--nnodes=2", "--rdzv-endpoint=h:1", "--rdzv-conf=is_host=false"} <= set(cmd)


@pytest.mark.parametrize("args, message", [
    (["configs/debug.yaml"], "--nnodes"),
    (["--nnodes", "2", "configs/debug.yaml"], "--node_rank"),
    (["--nnodes", "2", "--node_rank", "0", "configs/debug.yaml"], "--rdzv_endpoint"),
    (["--nnodes", "2", "--node_rank", "2", "--rdzv_endpoint", "h:1", "configs/debug.yaml"], "not below"),
    (["--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", "h", "configs/debug.yaml"], "HOST:PORT"),
    (["--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", "h:1"], "config file"),
])
def test_multi_node_rejects_incomplete_layouts(args, message):
    out = _run("launch/multi_node.sh", "--dry-run", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_help_and_missing_config():
    for script in ("launch/debug.sh", "launch/single_node.sh", "launch/multi_node.sh", "slurm/submit.sh"):
        out = _run(script, "--help")
        assert out.returncode == 0 and "--dry-run" in out.stdout, (script, out.stdout)
    for script in ("launch/debug.sh", "launch/single_node.sh"):
        out = _run(script, "--dry-run")
        assert out.returncode == 2 and "config" in out.stderr
    assert _run("launch/single_node.sh", "--dry-run", "--nproc_per_node", "0", "configs/debug.yaml").returncode == 2


def test_submit_dry_run_maps_environment_to_sbatch_options():
    cmd = _dry("slurm/submit.sh", "multi", "configs/llama3_8b_all_layers.yaml", "train.seed=1",
               NODES=4, TIME="12:00:00", PARTITION="gpu", SIGNAL_SECONDS=600)
    assert cmd == ["sbatch", "--time=12:00:00", "--partition=gpu", "--signal=USR1@600", "--nodes=4",
                   "slurm/multi_node.sbatch", "configs/llama3_8b_all_layers.yaml", "train.seed=1"]
    cmd = _dry("slurm/submit.sh", "single", "configs/debug.yaml", CPU=1, NODES=4)  # NODES: multi only
    assert cmd == ["sbatch", "--gpus-per-node=0", "--cpus-per-task=2", "slurm/single_node.sbatch", "configs/debug.yaml"]
    cmd = _dry("slurm/submit.sh", "sweep", "slurm/sweeps/debug_k.txt", CPU=1, NPROC_PER_NODE=1, ARRAY_PARALLEL=1)
    assert cmd == ["sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--array=0-1%1", "slurm/sweep.sbatch",
                   "slurm/sweeps/debug_k.txt"]
    assert _run("slurm/submit.sh", "--dry-run", "nodes", "configs/debug.yaml").returncode == 2


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in [*LAUNCH.glob("*.sh"), *(ROOT / "slurm").glob("*.sh"),
                                      *(ROOT / "slurm").glob("*.sbatch")])
    out = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- presets


HUB_LAYERS = {"openai-community/gpt2": 12, "EleutherAI/pythia-160m": 12, "EleutherAI/pythia-410m": 24,
              "meta-llama/Meta-Llama-3-8B": 32}


def test_every_preset_validates_offline(text_dir, tmp_path, monkeypatch):
    """load_config on every configs/*.yaml with the network forbidden; presets reading local text
    or images that this machine lacks (the Python docs package) are checked with test files instead."""
    from PIL import Image  # noqa: PLC0415

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image_dir / "red.png")
    def no_network(*args, **kwargs):
        raise AssertionError("config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert {"debug.yaml", "smollm2_main.yaml", "gpt2_small.yaml", "pythia_160m.yaml", "pythia_410m.yaml",
            "llama3_8b_all_layers.yaml"} <= {p.name for p in presets}
    studies = {"circuits": "circuits", "supervised": "evaluate-supervised"}  # preset name prefix -> command
    for path in presets:
        if "saes" not in yaml.safe_load(path.read_text()):  # a study's config (framework/studies.py)
            study = STUDY_COMMANDS[studies[path.name.split("_")[0]]]
            load_study_config(getattr(importlib.import_module(study.module), study.config_class), path)
            continue
        overrides = []
        raw = load_config_paths(path)
        if any(p.startswith("/") and not Path(p).exists() for p in raw):
            images = yaml.safe_load(path.read_text()).get("data", {}).get("source") == "images"
            overrides = [f"data.paths=[{image_dir if images else text_dir}]"]
        cfg = load_config(path, overrides)
        if cfg.model.name in HUB_LAYERS:  # hub presets: sites inside the model, hub dataset, GPU-sized batches
            n_layers = HUB_LAYERS[cfg.model.name]
            for s in cfg.saes:
                for site in filter(None, (s.site, s.output_site)):
                    assert int(site.split(".")[1]) < n_layers, (path.name, site)
            assert all("/" in p and not Path(p).exists() for p in cfg.data.paths), path.name
            if cfg.dist.sae_placement == "replicated":
                assert cfg.train.batch_size % 8 == 0, path.name
    llama = load_config(ROOT / "configs" / "llama3_8b_all_layers.yaml")
    assert llama.dist.sae_placement == "layer" and llama.dist.strategy == "ddp"  # ZeRO + layer is rejected
    assert [s.site for s in llama.saes] == [f"blocks.{i}.resid_post" for i in range(32)]


def load_config_paths(path: Path) -> list[str]:
    import yaml

    return (yaml.safe_load(path.read_text()).get("data") or {}).get("paths", [])


# --------------------------------------------------------------------------- real runs


def _tiny(run_dir: Path, text_dir: Path, total_tokens: int = 4096) -> list[str]:
    return ["configs/debug.yaml", f"run_dir={run_dir}", f"data.paths=[{text_dir}]", f"train.total_tokens={total_tokens}",
            "train.batch_size=256", "train.buffer_tokens=1024", "train.init_tokens=512", "eval.tokens=512",
            "eval.splice_tokens=128", "--quiet"]


def _check_run(run_dir: Path, steps: int, world: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == world, summary
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())["step"] == steps
    for name in ("resid2", "mlp1_transcoder"):
        cfg = json.loads((run_dir / "export" / name / "cfg.json").read_text())
        weights = load_file(str(run_dir / "export" / name / "sae_weights.safetensors"))
        assert weights["W_dec"].shape == (cfg["d_sae"], cfg["d_in"]) and all(w.isfinite().all() for w in weights.values())
    return summary


@pytest.mark.slow
def test_debug_script_trains(tmp_path, text_dir):
    out = _run("launch/debug.sh", *_tiny(tmp_path / "run", text_dir), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "trained 4,096 tokens" in out.stdout
    _check_run(tmp_path / "run", steps=16, world=1)


@pytest.mark.slow
def test_single_node_script_runs_two_processes(tmp_path, text_dir):
    t0 = time.time()
    out = _run("launch/single_node.sh", *_tiny(tmp_path / "run", text_dir), env=_env(CUDA_VISIBLE_DEVICES=""),
               timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = _check_run(tmp_path / "run", steps=16, world=2)
    print(f"single_node.sh, 2 CPU processes: {time.time() - t0:.1f} s wall, {summary['tokens_per_s']} tokens/s")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.slow
def test_single_node_script_preempted_by_signal_exits_75(tmp_path, text_dir):
    """SIGTERM to the launcher only (not to torchrun or the workers), sent while the workers are
    still starting (their handlers not installed yet): the launcher delivers it once they are,
    the two ranks checkpoint at the same early step, and the launcher exits 75."""
    run_dir = tmp_path / "run"
    args = _tiny(run_dir, text_dir, total_tokens=10_000_000)
    proc = subprocess.Popen(["bash", str(LAUNCH / "single_node.sh"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(CUDA_VISIBLE_DEVICES=""))
    try:
        deadline = time.time() + 60
        torchrun = []
        while time.time() < deadline and not torchrun:  # the launcher has started torchrun (traps are set)
            torchrun = [c for c in _children(proc.pid)
                        if "torch.distributed.run" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]
            time.sleep(0.1)
        assert torchrun, "torchrun did not start within 60 s"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    # both ranks stop at the same step (the flag is reduced across ranks); a rank whose handler ran
    # after that reduction reports "signal None"
    assert err.count("preempted: stopped by signal") == 2 and "preempted: stopped by signal 15" in err
    assert "single_node.sh: stopped by SIGTERM" in err
    latest = run_dir / "checkpoints" / "latest"
    state = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "state.json").read_text())
    assert 0 < state["step"] < 100 and f"at step {state['step']};" in err
    assert not (run_dir / "summary.json").exists()


def test_launchers_share_the_signal_logic():
    """single_node.sh and multi_node.sh source one run_torchrun/forward_signal implementation."""
    for name in ("single_node.sh", "multi_node.sh"):
        text = (LAUNCH / name).read_text()
        assert "/_common.sh\"" in text and "forward_signal()" not in text, name
    assert "forward_signal()" in (LAUNCH / "_common.sh").read_text()


# --------------------------------------------------------------------------- sbatch logic, fake SLURM
# The real-SLURM runs are in tests/test_slurm.py; these check the scripts' decisions (rendezvous,
# requeue or not, sweep lines) in a second, with srun and scontrol replaced by recording stubs.

FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_RECORD"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
if [ -n "${FAKE_SRUN_EXIT:-}" ]; then
  trap 'echo "srun got USR1" >> "$FAKE_RECORD"; exit 1' USR1
  for _ in $(seq 20); do sleep 0.1; done
  exit "$FAKE_SRUN_EXIT"
fi
exec "$@"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_RECORD"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\nnode-b\n'; fi
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record.txt"

    def run(script, *args, signal_after=None, sig=signal.SIGTERM, **env):
        record.write_text("")
        environ = _env(**{"FAKE_RECORD": record, "SLURM_JOB_ID": 12345, "SLURM_JOB_NUM_NODES": 1,
                          "SLURM_JOB_NODELIST": "node-a", "SLURM_NODEID": 0, "SLURM_CPUS_PER_TASK": 4,
                          "CUDA_VISIBLE_DEVICES": "", **env})
        environ["PATH"] = f"{bin_dir}:{environ['PATH']}"
        proc = subprocess.Popen(["bash", str(ROOT / "slurm" / script), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=environ, cwd=tmp_path)
        if signal_after is not None:
            time.sleep(signal_after)
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err, record.read_text()

    return run


def test_multi_node_sbatch_rendezvous_from_slurm(fake_slurm):
    # variables leaked from the submitting shell must not win over SLURM's
    rc, out, err, rec = fake_slurm("multi_node.sbatch", "configs/debug.yaml", "saes.0.k=4", "--dry-run",
                                   SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="node-[a-b]", SLURM_NODEID=1,
                                   MASTER_ADDR="stale", MASTER_PORT=1, NODE_RANK=0, NNODES=9)
    assert rc == 0, err
    assert "scontrol show hostnames node-[a-b]" in rec
    assert f"srun --nodes=2 --ntasks-per-node=1 --wait=600 --cpus-per-task=4 {ROOT}/launch/multi_node.sh" in rec
    cmd = shlex.split(out.strip())
    port = 10000 + 12345 % 20000
    assert {"--nnodes=2", "--nproc-per-node=2", f"--rdzv-endpoint=node-a:{port}", "--rdzv-id=12345",
            "--rdzv-conf=is_host=false", "OMP_NUM_THREADS=2"} <= set(cmd)
    assert cmd[-3:] == ["train", "configs/debug.yaml", "saes.0.k=4"]
    assert "attempt 1 (restart count 0)" in err and f"rendezvous node-a:{port}, 2 node(s)" in err


@pytest.mark.parametrize("exit_code, env, requeued, script_rc", [
    (75, {}, True, 0),  # preempted: requeue
    (75, {"SLURM_RESTART_COUNT": 3, "MAX_REQUEUES": 3}, False, 75),  # requeue budget used up
    (1, {}, False, 1),  # a failure is not retried
    (0, {}, False, 0),
])
def test_sbatch_requeues_only_a_preempted_step(fake_slurm, exit_code, env, requeued, script_rc):
    rc, _, err, rec = fake_slurm("single_node.sbatch", "configs/debug.yaml", FAKE_SRUN_EXIT=exit_code, **env)
    assert rc == script_rc, err
    assert ("scontrol requeue 12345" in rec) == requeued, rec
    assert "srun --nodes=1 --ntasks=1 --cpus-per-task=4" in rec


def test_sbatch_forwards_usr1_and_does_not_requeue_a_cancelled_job(fake_slurm):
    # USR1 to the batch shell only (scancel --batch): forwarded to srun, whose failure then means "requeue"
    rc, _, err, rec = fake_slurm("single_node.sbatch", "configs/debug.yaml", FAKE_SRUN_EXIT=0, signal_after=0.8,
                                 sig=signal.SIGUSR1)
    assert "srun got USR1" in rec and "scontrol requeue 12345" in rec and rc == 0, err
    # TERM (scancel, time limit, preemption by SLURM): the step's 75 is reported, the job not requeued
    rc, _, err, rec = fake_slurm("single_node.sbatch", "configs/debug.yaml", FAKE_SRUN_EXIT=75, signal_after=0.8)
    assert rc == 75 and "scontrol requeue" not in rec and "batch shell got SIGTERM" in err, err


def test_sweep_sbatch_picks_its_line(fake_slurm, tmp_path):
    sweep = tmp_path / "grid.txt"
    sweep.write_text("# comment\nconfigs/debug.yaml saes.0.k=4\n\n  # indented comment\n"
                     "configs/debug.yaml saes.0.k=16 --no-resume\nconfigs/debug.yaml run_dir=runs/mine\n")
    rc, out, err, _ = fake_slurm("sweep.sbatch", sweep, "train.seed=3", "--dry-run", SLURM_ARRAY_TASK_ID=1)
    assert rc == 0, err
    assert shlex.split(out.strip())[-6:] == ["train", "configs/debug.yaml", "saes.0.k=16", "--no-resume",
                                             "train.seed=3", "run_dir=runs/sweeps/grid/1"]
    assert "--nproc-per-node=2" in out
    rc, out, err, _ = fake_slurm("sweep.sbatch", sweep, "--dry-run", SLURM_ARRAY_TASK_ID=2, SWEEP_RUN_ROOT="/x")
    assert rc == 0 and shlex.split(out.strip())[-2:] == ["configs/debug.yaml", "run_dir=runs/mine"], err
    rc, _, err, _ = fake_slurm("sweep.sbatch", sweep, "--dry-run", SLURM_ARRAY_TASK_ID=3)
    assert rc == 2 and "has 3 lines (use --array=0-2)" in err
    rc, _, err, _ = fake_slurm("sweep.sbatch", sweep, "--dry-run")
    assert rc == 2 and "not an array task" in err
