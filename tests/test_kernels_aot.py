"""Ahead-of-time compilation of every Triton kernel for A100 (sm_80) and H100 (sm_90) without a
GPU (triton.compile with a GPUTarget; ptxas and cuobjdump ship in the triton wheel).

Every binary the presets can launch (kernels.benchmarks.aot.launch_specs: each kernel, each
config the encode tuner can pick, bf16 / tf32 / fp32 matmuls, AuxK's k_aux up to 2048 and the
widening to k = n) must compile, use no more shared memory than the target has, spill no
registers, and the encode's matmul must use tensor cores (wgmma on sm_90, mma on sm_80) for
bf16 and tf32. The binaries are compiled once per session (two processes) into a temporary
Triton cache, so every one goes through ptxas.
"""

import pathlib

import pytest
import triton
import yaml

from kernels.benchmarks import aot


@pytest.fixture(scope="module")
def specs():
    return aot.launch_specs()


@pytest.fixture(scope="module")
def rows(specs, tmp_path_factory):
    rows = aot.compile_all(specs, cache_dir=str(tmp_path_factory.mktemp("triton-aot-cache")))
    aot.print_rows(rows)  # the table (pytest -s shows it)
    return rows


def test_presets_match_the_configs():
    """The AOT shapes are the training configs' (n_latents, k, batch size; k_aux = d_in / 2);
    the study configs (circuits, supervised) train no SAE through the kernels' presets."""
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    training = {path.stem: yaml.safe_load(path.read_text()) for path in root.glob("*.yaml")}
    training = {name: cfg for name, cfg in training.items() if "saes" in cfg}
    assert {p.name for p in aot.PRESETS} == set(training)
    for preset in aot.PRESETS:
        cfg = training[preset.name]
        saes = cfg["saes"]
        assert {s["n_latents"] for s in saes} == {preset.n}, preset.name
        assert {s["k"] for s in saes} == set(preset.ks), preset.name
        assert not any(s.get("aux_k") for s in saes), preset.name  # the default k_aux = d_in / 2
        assert cfg["train"]["batch_size"] == preset.batch, preset.name


def test_specs_cover_every_kernel_config_and_width(specs):
    from kernels import triton_ops as T

    kernels = {name for name, obj in vars(T).items() if isinstance(obj, triton.runtime.jit.JITFunction)
               and name.endswith("_kernel")}
    assert kernels == {s.kernel for s in specs}, "a kernel without AOT coverage"
    enc = [s for s in specs if s.kernel == "_encode_tiles_kernel"]
    for target in aot.TARGETS:
        for kp in (T.KP_MIN, 32, 64, T.LARGE_KS):
            for dtype, precision in aot.COMPUTE_MODES:
                esize = 2 if dtype == "bf16" else 4
                want = T.encode_configs(kp, esize, precision, target, interpret=False)
                got = [dict(s.consts) for s in enc if s.target == target and dict(s.consts)["KP"] == kp
                       and dict(s.args)["xc_ptr"] == f"*{dtype}" and dict(s.consts)["PRECISION"] == precision]
                for cfg in want:
                    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
                    assert any(all(g[k] == v for k, v in blocks.items()) for g in got), (target, kp, dtype, cfg)
    uses = {u for s in enc for u in s.uses}
    assert "llama3_8b_all_layers AuxK k_aux=2048" in uses and "llama3_8b_all_layers widening k=n=65536" in uses


def test_every_binary_compiles_within_limits(rows):
    errors = [f"{r['kernel']} {r['config']} {r['target']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['target']} ({r['note']})"
        assert r["spills"] == 0 and r["stack"] == 0, f"register spills in {where}: {r['spills']} bytes"
        assert 0 < r["regs"] <= 255, where
        assert r["smem"] <= aot.limit_of(r["target"]), f"{where}: {r['smem']} B shared memory"


def test_encode_matmul_uses_tensor_cores(rows, specs):
    by_label = {}
    for s, r in zip(specs, rows):
        if s.kernel == "_encode_tiles_kernel":
            by_label[(s.mode, r["target"])] = by_label.get((s.mode, r["target"]), set()) | {r["insn"]}
    assert by_label[("bf16", "sm_90")] == {"wgmma"} and by_label[("tf32", "sm_90")] == {"wgmma"}
    assert by_label[("bf16", "sm_80")] == {"mma"} and by_label[("tf32", "sm_80")] == {"mma"}
    assert by_label[("fp32", "sm_90")] == {"fma"}  # TF32 switched off: exact fp32 on the FMA units
