"""Shared fixtures: real English text that ships with Python itself (stdlib docstrings),
so tests need neither network nor OS documentation packages; and the thread-count switch."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path


def _import_triton_for_the_interpreter() -> None:
    """Triton decides at `import triton` whether its own standard library (tl.zeros, tl.sum...)
    is interpreted. tests/test_triton_kernels.py runs a private copy of the kernels under the
    interpreter, which fails inside any process where triton was imported first without
    TRITON_INTERPRET=1 (by deepspeed, or tests/test_kernel_tuning.py's compiled-mode copy).
    So the suite imports triton here, before any test module, with the variable set, and
    restores it: `kernels.triton_ops` still builds its kernels for the compiler (it reads the
    variable at its own import), and the ahead-of-time compiles run in spawned processes."""
    if "triton" in sys.modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401, PLC0415
    except ImportError:
        pass  # tests that need triton say so themselves
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_the_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS_ENV = "SPARSEMILL_TEST_THREADS"


def pytest_configure(config):
    """`SPARSEMILL_TEST_THREADS=1 python -m pytest tests` runs the whole suite (and the
    processes it starts, through OMP_NUM_THREADS) with one intra-op thread: results must not
    depend on the thread count, which changes reduction orders and blockings."""
    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = threads

STDLIB_MODULES = ["json", "argparse", "collections", "pathlib", "functools", "itertools", "logging", "textwrap",
                  "string", "random", "statistics", "datetime", "dataclasses", "difflib", "heapq"]


def write_stdlib_text(folder: Path, min_chars: int = 400) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files, seen = [], set()
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(mod).items())
                 if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name]
        for i, doc in enumerate(d for d in docs if len(d) >= min_chars):
            if doc in seen:  # classes that share a docstring: keep documents unique
                continue
            seen.add(doc)
            path = folder / f"{name}_{i:03d}.txt"
            path.write_text(doc)
            files.append(path)
    return files


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    write_stdlib_text(folder)
    return folder


@pytest.fixture(scope="session")
def one_node_run(tmp_path_factory, text_dir) -> Path:
    """An uninterrupted `launch/single_node.sh` run (2 CPU processes, ddp) of
    tests/launching.tiny_args: the reference of tests/test_multinode.py and tests/test_orphans.py."""
    from launching import finish, kill_marked, new_marker, one_node, tiny_args  # noqa: PLC0415

    root, marker = tmp_path_factory.mktemp("one_node"), new_marker()
    try:
        finish([one_node(tiny_args(root / "run", text_dir), root / "run.log", marker)])
    finally:
        kill_marked(marker)
    return root / "run"
