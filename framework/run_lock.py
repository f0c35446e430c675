"""One training per run directory: an exclusive lock on RUN_DIR/train.lock.

Two trainings on one run directory overwrite and prune each other's checkpoints (an orphaned
run once deleted the checkpoint a rerun was loading), so a training takes this lock before it
writes anything and a second one is refused with an error naming the holder.

Only global rank 0 locks: the conflict is between jobs, each job has exactly one rank 0, and
the other ranks (on other nodes too) fail with it when it refuses.

The lock is `fcntl.flock` on the file, which the kernel drops when the holder dies however it
dies (kill -9, OOM), plus a JSON description of the holder written into the file (host, boot
id, pid, process start, command, time):
  - flock refused: the holder runs; the error names it.
  - flock granted, holder described on this kernel (same boot id): it is gone (the kernel
    would have refused otherwise); its lock is taken over with a warning.
  - flock granted, holder on another host: flock may be node-local on this filesystem (Lustre
    mounted with `localflock`), so the holder counts as alive while it keeps touching the
    file's mtime (every REFRESH_S): taken over only if it has not touched it for STALE_S, or
    does not within REFRESH_S more.
  - no flock on this filesystem (ENOLCK, ENOSYS): the same description-based checks, with a
    same-kernel holder alive while its pid runs with the same start time (a reused pid has
    another).
A clean release empties the file; it is never deleted (a process could then lock the old inode
while another creates a new one).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from framework.errors import ConfigError, UserError

log = logging.getLogger("sparsemill")

LOCK_NAME = "train.lock"
REFRESH_S = 5.0  # the holder touches the file this often ...
STALE_S = 60.0  # ... a holder on another host that has not for this long is gone (clock skew < 1 min)
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunLockError(UserError, RuntimeError):
    """The run directory cannot be locked (in use by another training, or unusable)."""

    exit_code = 1


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None if it
    does not run; with the pid it identifies a process on this host even when pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def describe_self() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid()), "user": os.environ.get("USER", ""),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def holder_text(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, "
            f"command: {holder.get('command') or '?'})")


class RunLock:
    """`with RunLock(run_dir):` holds the run directory for the block; rank > 0 (env RANK)
    does nothing. Raises RunLockError when another training holds it."""

    def __init__(self, run_dir: str | Path, rank: int | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self._fd: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> RunLock:
        if self.rank == 0:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        run_dir = self.path.parent
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"run_dir: cannot write to '{run_dir}' ({err.strerror}): the lock file {LOCK_NAME} "
                              "could not be created") from None
        try:
            flocked = self._flock(fd)
            holder = self._read(fd)
            if flocked is False:
                raise RunLockError(self._in_use(holder, "it holds the lock"))
            if holder:
                alive, why = self._alive(holder, flocked)
                if alive:
                    raise RunLockError(self._in_use(holder, why))
                log.warning("run_dir %s: taking over the stale lock of %s: %s", run_dir, holder_text(holder), why)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(describe_self(), indent=2).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        threading.Thread(target=self._refresh, name="sparsemill-run-lock", daemon=True).start()

    def release(self) -> None:
        """Empty the file, then unlock: the next training finds no holder and no warning."""
        if self._fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    # -- internals -------------------------------------------------------------------
    def _flock(self, fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: this filesystem has no flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            if err.errno in NO_FLOCK:
                log.warning("run_dir %s: the filesystem does not support flock (%s); relying on the lock file's "
                            "holder description only", self.path.parent, err.strerror)
                return None
            raise

    @staticmethod
    def _read(fd: int) -> dict | None:
        raw = os.pread(fd, 1 << 16, 0)
        if not raw.strip():
            return None
        try:
            holder = json.loads(raw)
        except ValueError:
            return {"pid": "?", "host": "?", "started": "?", "command": "(unreadable lock file)"}
        return holder if isinstance(holder, dict) else None

    def _alive(self, holder: dict, flocked: bool | None) -> tuple[bool, str]:
        """Whether the described holder still runs although flock was granted (or is missing),
        and why we think so (see the module docstring)."""
        if holder.get("boot_id") == _boot_id():
            pid = holder.get("pid")
            start = _process_start(pid) if isinstance(pid, int) else None
            if start is None:
                return False, f"process {pid} no longer runs"
            if start != holder.get("process_start"):
                return False, f"pid {pid} now belongs to another process"
            if flocked:
                return False, f"process {pid} runs but no longer holds the lock"
            return True, "that process is still running on this host"
        age = time.time() - self.path.stat().st_mtime
        if age > STALE_S:
            return False, f"its host has not refreshed the lock for {age:.0f} s (more than {STALE_S:.0f} s)"
        seen = self.path.stat().st_mtime
        deadline = time.monotonic() + REFRESH_S * 1.5
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if self.path.stat().st_mtime != seen:
                return True, "its host keeps refreshing the lock (flock is not shared between hosts here)"
        return False, f"its host stopped refreshing the lock {time.time() - seen:.0f} s ago"

    def _in_use(self, holder: dict | None, why: str) -> str:
        who = holder_text(holder) if holder else "another process (it has not described itself yet)"
        return (f"run_dir {self.path.parent} is in use by another training: {who}; {why}. Two trainings on one "
                f"run directory would overwrite each other's checkpoints: wait for it to finish, stop it, or set "
                f"another run_dir. (Lock file: {self.path}.)")

    def _refresh(self) -> None:
        """Tell holders on other hosts that this one is alive (see the module docstring)."""
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
