"""The package's import graph: every module imports alone in a fresh interpreter (no hidden
dependence on import order), and no two modules of framework/ and kernels/ import each
other, directly or through others (every import counts, also those inside functions)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("framework", "kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports (a `from pkg import mod` counts as pkg.mod)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") and MODULES[node].name == "__init__.py":
                continue  # a package importing its own submodules is no cycle
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# Imports each module in a child forked from an interpreter that has imported only third-party
# libraries (none of ours): what is tested, our modules' dependence on each other's import
# order, is unchanged, and each child saves the ~2 s of importing torch and transformers anew.
FORK_IMPORTER = """
import importlib, json, os, sys, traceback
import accelerate, datasets, numpy, safetensors, torch, transformers, yaml  # noqa: F401
assert not [m for m in sys.modules if m.split(".")[0] in ("framework", "kernels")], "ours imported early"
failed = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-1500:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    if os.waitpid(pid, 0)[1] != 0:
        failed[name] = message or "the child died"
print(json.dumps(failed))
"""


def test_every_module_imports_alone():
    """Each module in its own interpreter state (a forked child of one that imported no
    module of ours); `__main__` modules run the CLI when imported, by design, and are left out."""
    names = [n for n in sorted(MODULES) if not n.endswith("__main__")]
    done = subprocess.run([sys.executable, "-c", FORK_IMPORTER, *names], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, failed


def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise():
    """Importing sparsemill before torch makes idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE,
    read when torch loads libgomp); a policy the user set is kept."""
    code = "import os, framework, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                            capture_output=True, text=True, cwd=ROOT)
    assert (unset.stdout.strip(), chosen.stdout.strip()) == ("PASSIVE", "ACTIVE"), unset.stderr + chosen.stderr
