"""The C++ CPU kernels: the fused TopK selection (kernels/cpu_topk.cpp) and the backward's
sparse products (kernels/cpu_sparse.cpp), one extension built on first use with
`torch.utils.cpp_extension` (g++ and ninja, which DeepSpeed already requires) and cached per
machine; `python -m kernels.cpu_ext` builds it ahead of time (setup.sh does).

Without a compiler, or with SPARSEMILL_CPU_EXTENSION=0, `load()` returns None and the PyTorch
path in kernels/reference.py runs instead (same results up to ties, slower under contention).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_topk.cpp", "cpu_sparse.cpp", "cpu_module.cpp")]
HEADERS = [Path(__file__).with_name("cpu_ops.h")]
ENV_SWITCH = "SPARSEMILL_CPU_EXTENSION"
NAME = "sparsemill_cpu_kernels"
STALE_LOCK_S = 900  # a build takes 1-2 min; a lock older than this was left by a killed build

_lock = threading.Lock()
_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def load():
    """The compiled module, or None (disabled, or the build failed: warned once)."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:  # every encode asks: no lock once settled
        return _module
    with _lock:
        if not _tried:
            try:
                _module = _build()
            except Exception as err:  # noqa: BLE001 (any build failure: fall back, say why once)
                warnings.warn(f"sparsemill: the C++ CPU kernels (kernels/cpu_*.cpp) could not be built, so the "
                              f"PyTorch path runs instead (slower under contention): {str(err).strip()[-300:]}",
                              stacklevel=2)
            _tried = True  # after _module is set: a thread seeing it never reads a half-done build
    return _module


def build_dir() -> Path:
    """Per source version, torch version and Python: a changed source builds anew."""
    import torch  # noqa: PLC0415

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "sparsemill" / "extensions")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:16]
    return root / f"{NAME}-{digest}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"


def _build():
    """Import the built library directly when a finished build is recorded: torch's JIT loader
    takes a lock file and runs ninja on every load, and a process killed while holding that
    lock (tests kill workers with -9) would leave every later load waiting forever."""
    folder = build_dir()
    library, done = folder / f"{NAME}.so", folder / "built"
    if done.exists() and library.exists():
        spec = importlib.util.spec_from_file_location(NAME, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils import cpp_extension  # noqa: PLC0415 (only when a CPU encode needs it)

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:  # a build killed midway
        lock.unlink(missing_ok=True)
    module = cpp_extension.load(NAME, [str(p) for p in SOURCES], build_directory=str(folder),
                                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    done.write_text(str(library))
    return module


if __name__ == "__main__":
    start = time.perf_counter()
    if load() is None:
        raise SystemExit(f"cpu_ext: not built ({ENV_SWITCH}={os.environ.get(ENV_SWITCH)!r} or the warning above)")
    print(f"cpu_ext: C++ CPU kernels ready ({time.perf_counter() - start:.1f} s)")
