"""Vision encoders as the frozen model: sites resolve on every tiny vision family, positions
select the right tokens, the downstream embedding metric reads 1 for a perfect reconstruction
and 0 for zero ablation, and whole `sparsemill train` runs on images (ViT; CLIP with zero-shot
logits) write metrics, resumable checkpoints and exports; bad inputs fail naming the key."""

import json
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from framework import checkpoint, hooks, vision
from framework.cli import main
from framework.config import ConfigError, load_config
from framework.llm import load_frozen
from framework.config import ModelConfig

FAMILIES = ["tiny-vit", "tiny-clip_vision_model", "tiny-clip", "tiny-siglip_vision_model", "tiny-dinov2"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """24 small real-format images (PNG and JPEG) of coloured rectangles on noise."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        arr = (rng.random((40 + i, 48, 3)) * 80).astype(np.uint8)
        y, x = rng.integers(0, 20, 2)
        arr[y:y + 16, x:x + 20] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(folder / (f"img{i:02d}." + ("png" if i % 3 else "jpg")))
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_sites_resolve_and_early_stop_equals_full_forward(name):
    model = load_frozen(ModelConfig(name=name, device="cpu"))[0]
    specs = [hooks.parse_site(f"blocks.1.{kind}") for kind in sorted(hooks.SITE_KINDS)]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with hooks.capture(model, specs, stop_early=False) as full:
        vision.image_embedding(model, pixels)
    full = dict(full)
    deeper = []
    blocks = model.get_submodule(hooks.layout_of(model).blocks)
    handle = blocks[2].register_forward_hook(lambda *a: deeper.append(1))
    with hooks.capture(model, specs) as early:
        hooks.run_until_captured(lambda: vision.image_embedding(model, pixels))
    handle.remove()
    assert not deeper
    tokens = 17 if vision.model_family(model).has_cls else 16
    for spec in specs:
        assert early[spec.name].shape == (2, tokens, 64)
        torch.testing.assert_close(early[spec.name], full[spec.name], rtol=0, atol=0)
    out_proj = blocks[1].get_submodule(hooks.layout_of(model).attn_z)  # attn_z is the output projection's input
    torch.testing.assert_close(out_proj(full["blocks.1.attn_z"]), full["blocks.1.attn_out"])
    attn_added = full["blocks.1.attn_out"]
    if name == "tiny-dinov2":  # its attn_out is read before the layer scale
        attn_added = blocks[1].layer_scale1(attn_added)
    torch.testing.assert_close(full["blocks.1.resid_mid"], full["blocks.1.resid_pre"] + attn_added)  # pre-LN blocks


def _config(tmp_path, image_dir, **over) -> dict:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": "tiny-vit", "device": "cpu"},
        "data": {"source": "images", "paths": [str(image_dir)], "llm_batch_size": 4},
        "saes": [{"name": "resid1", "site": "blocks.1.resid_post", "n_latents": 64, "k": 4},
                 {"name": "mlp2", "site": "blocks.2.mlp_out", "n_latents": 64, "k": 4}],
        "train": {"total_tokens": 1088, "batch_size": 68, "buffer_tokens": 272, "init_tokens": 136,
                  "warmup_steps": 2, "checkpoint_every": 8},
        "eval": {"tokens": 68, "splice_tokens": 68},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in over.items():
        section, _, leaf = key.partition(".")
        cfg[section] = value if not leaf else {**cfg[section], leaf: value}
    return cfg


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("positions,per_image", [("all", 17), ("cls", 1), ("patches", 16)])
def test_positions_choose_the_tokens(tmp_path, image_dir, positions, per_image):
    from framework.placement import build_source

    cfg = load_config(_write(tmp_path, _config(tmp_path, image_dir, **{"data.positions": positions})))
    source = build_source(cfg, torch.device("cpu"))
    batch = next(source.batches("eval"))
    assert source.tokens_per_image == 17
    n_eval = len([i for i in range(24) if i % vision.EVAL_EVERY == 0])
    assert {v.shape for v in batch.values()} == {(n_eval * per_image, 64)}
    full = source.capture(source.pixels([Image.open(sorted(image_dir.iterdir())[0])]))["blocks.1.resid_post"][0]
    torch.testing.assert_close(batch["blocks.1.resid_post"][:per_image], full[source.keep_mask(17)])


class _Trainer:
    """A stand-in SAE trainer whose reconstruction is `fn(x)`."""

    def __init__(self, site, fn):
        self.input_site = self.output_site = site
        self.sae = SimpleNamespace(reconstruct=fn)

    @contextmanager
    def evaluating(self, whole=False):
        yield self.sae


def test_embedding_metric_reads_one_for_perfect_and_zero_for_ablation(tmp_path, image_dir):
    from framework.placement import build_source

    cfg = load_config(_write(tmp_path, _config(tmp_path, image_dir)))
    source = build_source(cfg, torch.device("cpu"))
    site = "blocks.1.resid_post"
    m = source.downstream_metrics({"perfect": _Trainer(site, lambda x: x.clone()),
                                   "zero": _Trainer(site, torch.zeros_like)}, 10_000, lambda t: t)
    assert m["perfect"]["embed_cos"] == pytest.approx(1.0, abs=1e-5)
    assert m["perfect"]["embed_rel_err"] < 1e-4 and m["perfect"]["embed_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["zero"]["embed_recovered"] == pytest.approx(0.0, abs=1e-6) and m["zero"]["embed_rel_err"] > 1e-3
    assert m["zero"]["splice_images"] == len([i for i in range(24) if i % vision.EVAL_EVERY == 0])


@pytest.mark.slow
def test_vit_run_writes_metrics_exports_and_resumes(tmp_path, image_dir, capsys):
    path = _write(tmp_path, _config(tmp_path, image_dir))
    assert main(["train", path, "--quiet"]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "eval.json").read_text())
    for name in ("resid1", "mlp2"):
        m = metrics[name]
        assert 0 < m["fvu"] < 1.5 and 0 < m["l0"] <= 4 and 0 <= m["dead_frac"] <= 1
        assert {"embed_cos", "embed_rel_err", "embed_recovered"} <= set(m) and "delta_ce" not in m
    exported = json.loads((run / "export" / "mlp2" / "cfg.json").read_text())
    assert exported["metadata"]["hook_name"] == "blocks.2.hook_mlp_out"
    assert exported["metadata"]["model_name"] == "tiny-vit"
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_00000016"
    capsys.readouterr()
    # a longer budget resumes from the checkpoint (data position of kind "images") and continues
    assert main(["train", path, "--quiet", "train.total_tokens=1360"]) == 0
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "step_00000020"


@pytest.mark.slow
def test_clip_zero_shot_logits(tmp_path, image_dir):
    cfg = _config(tmp_path, image_dir, **{"model.name": "tiny-clip", "eval.zero_shot_labels": ["cat", "dog", "car"],
                                          "data.positions": "patches"})
    cfg["saes"] = cfg["saes"][:1]
    cfg["train"]["total_tokens"] = 512
    cfg["train"]["batch_size"] = 64
    cfg["train"]["buffer_tokens"] = 256
    assert main(["train", _write(tmp_path, cfg), "--quiet"]) == 0
    m = json.loads((tmp_path / "run" / "eval.json").read_text())["resid1"]
    assert m["zero_shot_kl"] >= 0 and 0 <= m["zero_shot_top1_agreement"] <= 1 and "embed_cos" in m


def test_bad_inputs_fail_before_loading(tmp_path, image_dir, text_dir):
    def error(**over):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, _config(tmp_path, image_dir, **over)))
        return str(err.value)

    assert "data.positions: 'middle' is not one of ['all', 'cls', 'patches']" in error(**{"data.positions": "middle"})
    assert "has no CLS token" in error(**{"model.name": "tiny-siglip_vision_model", "data.positions": "cls"})
    assert "is not a vision encoder" in error(**{"model.name": "tiny-llama"})
    assert "is not an image file" in error(**{"data.paths": [str(next(text_dir.iterdir()))]})
    assert "needs a causal LM's next-token loss" in error(saes=[{"site": "blocks.1.resid_post", "kind": "gsae"}])
    assert "zero-shot logits need a CLIP model" in error(**{"eval.zero_shot_labels": ["cat"]})
    assert "unknown hook site" in error(saes=[{"site": "blocks.1.resid"}])


def test_ranks_split_the_images_and_a_position_resumes_exactly(tmp_path, image_dir):
    from framework.placement import build_source

    cfg = load_config(_write(tmp_path, _config(tmp_path, image_dir)))
    sources = [build_source(cfg, torch.device("cpu"), rank, 2) for rank in range(2)]
    train = 24 - len([i for i in range(24) if i % vision.EVAL_EVERY == 0])
    seen = [[np.asarray(im).tobytes() for _, im in zip(range(train // 2), s.images("train"))] for s in sources]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == train  # one epoch, split
    one = build_source(cfg, torch.device("cpu"))
    stream = one.images("train")
    first = [np.asarray(next(stream)).tobytes() for _ in range(5)]
    resumed = build_source(cfg, torch.device("cpu"))
    resumed.load_stream_state(json.loads(json.dumps(one.stream_state())))  # JSON round trip, as in a checkpoint
    assert np.asarray(next(resumed.images("train"))).tobytes() == np.asarray(next(stream)).tobytes()
    assert len(set(first)) == 5
