"""The package's import graph: every module imports alone in a fresh interpreter (no hidden
dependence on import order), and no two modules of framework/ and kernels/ import each
other, directly or through others (every import counts, also those inside functions)."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def test_every_module_imports_alone():
    """One fresh interpreter per module (two at a time); `__main__` modules run the CLI when
    imported, by design, and are left out."""
    names = [n for n in sorted(MODULES) if not n.endswith("__main__")]

    def run(name):
        return name, subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                                    cwd=ROOT, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = {name: done.stderr[-1500:] for name, done in pool.map(run, names) if done.returncode != 0}
    assert not failed, failed
