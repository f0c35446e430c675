"""framework/host_memory.py: freed host memory is reused, not mapped afresh (counted in page
faults, not timed), and the setting is on in training processes on CPU."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from framework import host_memory
    assert host_memory.keep_freed_memory() and host_memory.keep_freed_memory()  # idempotent
def faults_of_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_fresh_block() for _ in range(12)]  # malloc settles after a few blocks
print(max(faults[-3:]), min(faults[-3:]))
"""


def _faults(mode: str) -> tuple[int, int]:
    """(max, min) page faults of allocating and filling a 64 MiB block, once malloc has settled."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    most, least = out.stdout.split()[-2:]
    return int(most), int(least)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_large_block_reuses_freed_pages():
    pages = (64 << 20) // 4096
    assert _faults("default")[1] > pages // 2  # glibc maps every 64 MiB block afresh: the probe sees it
    assert _faults("keep")[0] < pages // 20


def test_the_engine_keeps_freed_memory_on_cpu(monkeypatch):
    from framework import engine as engine_mod
    from framework.schema import DistConfig

    calls = []
    monkeypatch.setattr(engine_mod.host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    eng = engine_mod.Engine(DistConfig(), "cpu")
    try:
        assert calls == [1]
    finally:
        eng.close()
