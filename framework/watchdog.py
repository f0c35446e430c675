"""Workers that never outlive their job and never wait forever.

torchrun starts each worker in its own session, so killing a launcher (kill -9 of its process
group, an OOM kill) left the workers running: asleep in a collective whose peer was gone, or
still training and pruning checkpoints under a rerun. Here:

  die_with_launcher()   a worker started by torchrun's agent is SIGKILLed by the kernel when
                        the agent dies (PR_SET_PDEATHSIG), backed by a thread polling the
                        parent pid. SIGKILL rather than a last checkpoint: a save needs every
                        rank, and checkpoints are atomic, so dying at any moment loses only
                        the steps since the last one.
  bound_waits(T)        every wait - the process group's store and setup, barriers, the
                        checkpoint agreement, every collective of every group - ends after
                        `dist.timeout_s` = T seconds with an error; a heartbeat in the job's
                        store then tells which ranks stopped answering. Waits torch leaves
                        unbounded (a frozen store) are ended by a stall watch.
  describe_failure(e)   the one-paragraph message a rank prints for such an error: what it
                        was waiting for (from the stack), why (timeout, or a peer's connection
                        closed), and the silent ranks.
The grace period for stop signals (a SIGTERM that never reaches a step boundary) is in
framework/preemption.py.

Test hook: SPARSEMILL_EVAL_DELAY=<seconds> pauses inside each evaluation (see pause), so a
kill can be made to land mid-eval.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d

AGENT_PID_ENV = "SPARSEMILL_AGENT_PID"  # set by launch/_common.sh: the pid torchrun runs as
EVAL_DELAY_ENV = "SPARSEMILL_EVAL_DELAY"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0
HEARTBEAT_S = 2.0
STALL_FACTOR = 1.5  # x dist.timeout_s: a wait torch did not end by then never ends (see _watch_stalls)
HEARTBEAT_KEY = "sparsemill/heartbeat/{}"
HOST_KEY = "sparsemill/host/{}"
RERUN = "Rerun the same command (on every node) to resume from the last checkpoint."

# (file in framework/, function) -> what a rank inside it waits for; the innermost one on the
# stack names the wait. Formatted with that frame's locals (e.g. the checkpoint's name).
WAITS = {
    ("engine.py", "__init__"): "setting up the process group (connecting to the job's store and to every rank)",
    ("engine.py", "close"): "the final barrier",
    ("checkpoint.py", "_agree"): "the checkpoint agreement of {name} (every rank reports whether its part of the save "
                                 "was written)",
    ("checkpoint.py", "save"): "writing checkpoint {name}",
    ("checkpoint.py", "resume"): "resuming from a checkpoint",
    ("checkpoint.py", "due"): "the wall-clock checkpoint decision",
    ("placement.py", "init_saes"): "sharing the initialisation sample",
    ("train.py", "run_eval"): "an evaluation",
    ("train.py", "export_all"): "the final export",
    ("train.py", "_gather_dicts"): "gathering the metrics",
    ("train.py", "_train"): "training",
    ("preemption.py", "should_stop"): "the per-step stop-signal check",
    ("sae_trainer.py", "step"): "a training step (gradient and statistics reductions)",
    ("activations.py", "batches"): "reading the next batch",
}

_timeout_s: float | None = None  # this process's dist.timeout_s, for the messages
_heartbeat: _Heartbeat | None = None


def _rank() -> str:
    return os.environ.get("RANK", "0")


def who() -> str:
    return f"sparsemill rank {_rank()} ({socket.gethostname()})"


def say(message: str) -> None:
    print(f"{who()}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- launcher death


def die_with_launcher() -> None:
    """Under torchrun's agent (TORCHELASTIC_RUN_ID set), end this process when the agent ends.
    The launch scripts name the agent's pid (AGENT_PID_ENV), which also catches an agent that
    died before this process got here; otherwise the parent at this moment is taken."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    named = int(os.environ.get(AGENT_PID_ENV) or 0)
    if named and named != agent and not os.path.exists(f"/proc/{named}"):
        agent = named  # the agent is already gone: the watch below ends us at once
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watch still polls
    threading.Thread(target=_watch_parent, args=(agent,), name="sparsemill-parent-watch", daemon=True).start()


def _watch_parent(agent: int) -> None:
    while os.getppid() == agent:
        time.sleep(PARENT_POLL_S)
    say(f"its launcher (torchrun's agent, pid {agent}) is gone; exiting")
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- bounded waits


def bound_waits(timeout_s: float) -> None:
    """Before any process group exists: `timeout_s` becomes torch's default timeout, which
    init_process_group (store and setup), gloo collectives and every later new_group (DeepSpeed's
    groups, the latent-shard mesh) use; otherwise 30 minutes for gloo. NCCL's watchdog aborts
    the process on it (TORCH_NCCL_ASYNC_ERROR_HANDLING, set by torchrun). In a multi-process
    job it also starts the heartbeat and the stall watch."""
    global _timeout_s, _heartbeat
    _timeout_s = timeout_s
    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and _heartbeat is None and {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        _heartbeat = _Heartbeat(int(_rank()), world, timeout_s)
        threading.Thread(target=_watch_stalls, args=(threading.current_thread(), timeout_s),
                         name="sparsemill-stall-watch", daemon=True).start()


def _watch_stalls(main: threading.Thread, timeout_s: float) -> None:
    """torch does not bound every wait: a TCPStore client whose server is frozen (SIGSTOPped,
    or its node hung without closing connections) waits forever in init_process_group and
    new_group, whatever their timeout. So: if the main thread sits in one call inside
    torch.distributed (the same frame at the same instruction) for STALL_FACTOR x timeout_s,
    which torch would have ended by then had it bounded it, say where and exit. The frame is
    held between samples only while it is torch.distributed's, so that its identity is exact."""
    limit = STALL_FACTOR * timeout_s + 5.0
    held, lasti, since = None, -1, time.monotonic()
    while main.is_alive():
        time.sleep(1.0)
        frame = sys._current_frames().get(main.ident)
        if frame is None or f"{os.sep}torch{os.sep}distributed{os.sep}" not in frame.f_code.co_filename:
            held, frame = None, None
            continue
        if frame is not held or frame.f_lasti != lasti:
            held, lasti, since = frame, frame.f_lasti, time.monotonic()
            continue
        stalled = time.monotonic() - since
        if stalled > limit:
            silent = _heartbeat.silent_ranks() if _heartbeat is not None else ""
            say(f"the distributed job is stuck {describe_wait(stack_frames(main))}: blocked in "
                f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}) for {stalled:.0f} s, more "
                f"than dist.timeout_s={timeout_s:g} s, and torch did not end the wait (a node that froze without "
                f"closing its connections). {silent} Exiting. {RERUN}")
            os._exit(1)


class _Heartbeat:
    """Each rank bumps a counter in the job's store (its own client connection, so a main
    thread blocked in a store wait does not stop it) every HEARTBEAT_S; after a failure, the
    ranks whose counters stand still are the ones that stopped answering. Counters, not
    timestamps: node clocks differ. A frozen store never answers (nor times out): every use
    of it here is bounded by a thread join."""

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.store = None
        self.error: str | None = None
        self.answered = time.monotonic()  # when the store last answered this thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparsemill-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop before the interpreter exits: a daemon thread returning from a store call during
        finalization is ended with pthread_exit, whose unwinding through torch's C++ aborts the
        process ("terminate called without an active exception"). A thread stuck in a call to a
        dead store never returns, and so is harmless."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S + 2.0)
        if not self._thread.is_alive():
            self.store = None  # its client goes now, not during the interpreter's teardown

    def _run(self) -> None:
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=min(self.timeout_s, 10.0)), wait_for_workers=False)
            store.set(HOST_KEY.format(self.rank), socket.gethostname())
            self.store = store
            while not self._stop.is_set():
                store.add(HEARTBEAT_KEY.format(self.rank), 1)
                self.answered = time.monotonic()
                self._stop.wait(HEARTBEAT_S)
        except Exception as err:  # noqa: BLE001 - the store is gone; the failure report says so
            self.error = _first_line(err)

    def silent_ranks(self) -> str:
        """A sentence naming the ranks that stopped answering (watched for 2.5 heartbeats)."""
        where = f"the job's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        quiet = time.monotonic() - self.answered
        if self.store is None or self.error or quiet > 3 * HEARTBEAT_S:
            why = self.error or (f"no answer for {quiet:.0f} s" if self.store is not None else "never connected")
            return (f"{where} (held by the torchrun agent of one node) does not answer ({why}): that node is down "
                    "or frozen.")
        found: list = []
        probe = threading.Thread(target=lambda: found.append(self._probe()), daemon=True)
        probe.start()
        probe.join(3 * HEARTBEAT_S + 5.0)
        if not found or found[0] is None:
            return f"{where} stopped answering too: the node holding it (its torchrun agent) is down or frozen."
        silent, hosts = found[0]
        if not silent:
            return "Every other rank still answers its heartbeat (the fault is in a collective, not a lost rank)."
        names = ", ".join(f"rank {r} (host {hosts[r]})" for r in silent)
        return f"Not answering for {2.5 * HEARTBEAT_S:g} s: {names}."

    def _probe(self) -> tuple[list[int], dict[int, str]] | None:
        """(silent ranks, their hosts), or None if the store failed meanwhile."""
        store = self.store
        try:
            keys = [HEARTBEAT_KEY.format(r) for r in range(self.world)]
            before = [store.add(k, 0) for k in keys]
            time.sleep(2.5 * HEARTBEAT_S)
            after = [store.add(k, 0) for k in keys]
            silent = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            hosts = {r: store.get(HOST_KEY.format(r)).decode() if store.check([HOST_KEY.format(r)]) else "?"
                     for r in silent}
        except Exception:  # noqa: BLE001
            return None
        return silent, hosts


# --------------------------------------------------------------------------- describing failures


def is_distributed_failure(err: BaseException) -> bool:
    """torch's distributed errors (store, network, NCCL), and gloo's, which are plain
    RuntimeErrors carrying gloo's source path."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "/gloo/" in str(err))


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)  # gloo's "[.../pair.cc:537] "
    return line.split(". This is typically caused by")[0]  # gloo's generic advice


def _reason(err: BaseException) -> str:
    msg = _first_line(err)
    if re.search(r"timed? ?out|timeout", msg, re.IGNORECASE):
        return (f"no answer within dist.timeout_s={_timeout_s or 0:g} s ({msg}); if a rank legitimately needs longer "
                "(loading a large model, hashing a large checkpoint), raise dist.timeout_s")
    if re.search(r"reset by peer|closed by peer|broken pipe|got 0 bytes|connection refused|connection closed", msg,
                 re.IGNORECASE):
        return f"a connection to another rank closed: that process died or its node went down ({msg})"
    return msg


def describe_wait(frames) -> str:
    """What a rank whose stack is `frames` (innermost first) is doing, e.g. "in the checkpoint
    agreement of step_00000012 after step 12"."""
    what, step = None, None
    for frame in frames:
        code = frame.f_code
        key = (os.path.basename(code.co_filename), code.co_name)
        if f"{os.sep}framework{os.sep}" not in code.co_filename or key not in WAITS:
            continue
        if what is None:
            try:
                what = WAITS[key].format(**frame.f_locals)
            except (KeyError, IndexError, ValueError):
                what = WAITS[key].split(" {")[0]
        if key == ("train.py", "_train"):
            step = getattr(frame.f_locals.get("progress"), "step", None)
    where = f"in {what}" if what else "outside the training loop"
    return where + (f" after step {step}" if isinstance(step, int) else "")


def _traceback_frames(err: BaseException) -> list:
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def stack_frames(thread: threading.Thread) -> list:
    """The live stack of `thread`, innermost first."""
    frames, frame = [], sys._current_frames().get(thread.ident)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def describe_failure(err: BaseException) -> str:
    silent = _heartbeat.silent_ranks() if _heartbeat is not None else ""
    return (f"{who()}: the distributed job failed "
            f"{describe_wait(_traceback_frames(err))}: {_reason(err)}. {silent} This rank stops; the others stop "
            f"the same way. {RERUN}")


# --------------------------------------------------------------------------- test hook


def pause(env: str, what: str) -> None:
    """Sleep $env seconds if set, after saying so on stderr: lets a test kill a run in `what`."""
    delay = float(os.environ.get(env) or 0)
    if delay:
        say(f"{env}: pausing {delay:g} s in {what}")
        time.sleep(delay)
