"""Durable files: everything the project persists (checkpoints, exports, run state) is written
through here, fsynced, and published by renames, so a crash or kill at any moment leaves
either the old version or the new one, never a torn file or folder.

Test hook: SPARSEMILL_SAVE_DELAY=<seconds> sleeps after each file written, so a kill can be
made to land in the middle of a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

SAVE_DELAY_ENV = "SPARSEMILL_SAVE_DELAY"


def write_file(path: Path, data: bytes) -> None:
    """Written, flushed and fsynced (not yet published: its folder is renamed into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)


def write_json(path: Path, obj) -> None:
    write_file(path, json.dumps(obj, indent=2).encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every folder below `root` (deepest first), then `root`: their entries reach the disk."""
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_dir(d)
    fsync_dir(root)


def hash_file(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by a complete new version (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_file(tmp, text.encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename the complete, fsynced folder `tmp` to `final`, replacing an existing `final`
    only after the new one is in place (the old one is kept aside until then)."""
    fsync_tree(tmp)
    trash = final.with_name(f".trash_{final.name}")
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


def fresh_tmp_folder(final: Path) -> Path:
    """An empty sibling of `final` to write a folder into before `publish_folder` publishes it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp
