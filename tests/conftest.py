"""Shared fixtures: real English text that ships with Python itself (stdlib docstrings),
so tests need neither network nor OS documentation packages; and the thread-count switch."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import pytest
import torch

THREADS_ENV = "SPARSEMILL_TEST_THREADS"


def pytest_configure(config):
    """`SPARSEMILL_TEST_THREADS=1 python -m pytest tests` runs the whole suite (and the
    processes it starts, through OMP_NUM_THREADS) with one intra-op thread: results must not
    depend on the thread count, which changes reduction orders and blockings."""
    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = threads

@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread avoids oversubscription on a shared machine (use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
