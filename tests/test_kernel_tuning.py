"""The encode tuner's policy, on CPU: bucketed keys, one benchmark per bucket per run, a
bounded LRU cache, loud failure when no config runs. Benchmarks go through an injected fake
timer (the real one needs a GPU); the key and config functions are the ones the launcher uses."""

import random

import pytest
import torch

from kernels import triton_ops as T


def _gpu_configs(key):
    """The launcher's config list for a key, as on a GPU (not the interpreter's single tile)."""
    dtype, precision, kp, *_, cc = key
    return T.encode_configs(kp, 2 if "16" in dtype else 4, precision, cc, interpret=False)


class FakeTimer:
    """ms per config: deterministic, distinct, and a count of benchmark calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        return 1.0 + 0.1 * (self.calls % 5)


def _tuner(timer, **kw):
    return T.Tuner("fake_kernel", _gpu_configs, timer=timer, interpret=False, **kw)


def test_changing_dead_latent_count_benchmarks_once_per_bucket():
    """AuxK's N (the dead-latent count) changes nearly every step; over 100 steps the tuner
    benchmarks each power-of-two bucket once, and the main encode's fixed shape once."""
    timer = FakeTimer()
    tuner = _tuner(timer)
    rng = random.Random(0)
    n_dead, buckets = 3000.0, set()
    for _ in range(100):
        n_dead = min(65536.0, max(300.0, n_dead * 2 ** rng.uniform(-0.5, 0.5)))
        aux = T.encode_tuning_key(torch.bfloat16, "ieee", T.LARGE_KS, 8192, int(n_dead), 4096)
        main = T.encode_tuning_key(torch.bfloat16, "ieee", 64, 8192, 65536, 4096)
        for key in (main, aux):
            tuner.pick(key, run=lambda cfg: None)
        buckets.add(aux[4])
    assert len(buckets) >= 3  # the walk did cross buckets: the test exercises re-use
    assert tuner.benchmarks == len(buckets) + 1
    n_configs = len(_gpu_configs(main))
    assert n_configs > 1 and timer.calls == (len(buckets) + 1) * n_configs
    # a second run over the same shapes benchmarks nothing
    calls = timer.calls
    for n in range(2100, 65536, 997):
        tuner.pick(T.encode_tuning_key(torch.bfloat16, "ieee", T.LARGE_KS, 8192, n, 4096), run=lambda cfg: None)
    assert timer.calls == calls


def test_launch_site_uses_bucketed_keys(monkeypatch):
    """_tile_candidates (what every encode launches) keys the tuner by bucketed shape."""
    keys = []

    class Recorder:
        def __call__(self, grid, key, *args, **consts):
            keys.append(key)

    monkeypatch.setattr(T, "_ENCODE_TUNER", Recorder())
    for n in (1000, 1020, 1024, 1025):
        w = torch.zeros(n, 64)
        T._tile_candidates(torch.zeros(300, 64), w, torch.zeros(n), None, 16, 512, False, "ieee")
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert keys[0] == T.encode_tuning_key(torch.float32, "ieee", 16, 512, 1024, 64)


def test_fastest_config_wins_and_cache_is_bounded():
    order = []

    def timer(fn):
        fn()
        return [3.0, 1.0, 2.0][len(order) % 3 - 1]

    tuner = T.Tuner("fake_kernel", _gpu_configs, timer=timer, interpret=False, max_entries=3)
    key = T.encode_tuning_key(torch.bfloat16, "ieee", 32, 4096, 24576, 768)
    configs = _gpu_configs(key)
    assert len(configs) == 3
    assert tuner.pick(key, run=lambda cfg: order.append(cfg)) == configs[1]
    assert order == configs
    for n in (1, 2, 3, 4, 5):
        tuner.pick(T.encode_tuning_key(torch.bfloat16, "ieee", 32, 4096, 2**n, 768), run=lambda cfg: None)
    assert len(tuner.cache) == 3 and key not in tuner.cache  # least recently used went first


def test_every_config_failing_raises_with_the_reasons():
    def timer(fn):
        raise RuntimeError("out of resources: shared memory")

    tuner = _tuner(timer)
    key = T.encode_tuning_key(torch.float32, "tf32", 128, 8192, 65536, 4096)
    with pytest.raises(RuntimeError, match="(?s)no launch config of fake_kernel runs.*out of resources"):
        tuner.pick(key, run=lambda cfg: None)


def test_interpreter_takes_the_first_config_without_benchmarking():
    timer = FakeTimer()
    tuner = T.Tuner("fake_kernel", _gpu_configs, timer=timer, interpret=True)
    key = T.encode_tuning_key(torch.bfloat16, "ieee", 32, 4096, 24576, 768)
    assert tuner.pick(key, run=lambda cfg: None) == _gpu_configs(key)[0]
    assert timer.calls == 0 and tuner.benchmarks == 0


def test_configs_respect_register_and_shared_memory_budgets():
    """Static side of what the AOT test measures: every tile keeps the running list within 32
    entries per thread, BLOCK_B >= 64 for tensor-core tiles (sm_90's wgmma), and the pipelined
    operand tiles within the target's shared memory."""
    for cc in (80, 90):
        for kp in (16, 32, 64, 128):
            for esize, precision in ((2, "ieee"), (4, "tf32"), (4, "ieee")):
                for c in T.encode_configs(kp, esize, precision, cc, interpret=False):
                    assert c["BLOCK_B"] * kp <= 32 * 32 * c["num_warps"]
                    if not (esize == 4 and precision == "ieee"):
                        assert c["BLOCK_B"] >= 64
                    smem = c["num_stages"] * (c["BLOCK_B"] + c["BLOCK_N"]) * c["BLOCK_D"] * esize
                    assert smem <= T.smem_limit(cc)


def test_tf32_policy(monkeypatch):
    """fp32 operands use TF32 tensor cores on GPU by default; SPARSEMILL_TF32=0 or tf32=False
    gives exact fp32."""
    if T.INTERPRET:
        pytest.fail("kernels.triton_ops was imported under TRITON_INTERPRET=1 (run this module without it)")
    assert T.dot_precision(torch.float32, True) == "tf32"
    assert T.dot_precision(torch.float32, False) == "ieee"
    assert T.dot_precision(torch.bfloat16, True) == "ieee"  # bf16 tensor cores; the flag is moot
    monkeypatch.delenv("SPARSEMILL_TF32", raising=False)
    assert T._tf32_default() is True
    monkeypatch.setenv("SPARSEMILL_TF32", "0")
    assert T._tf32_default() is False
