"""Hook sites resolve on each supported architecture; the early-stopped forward records the
same activations as a full forward and really skips the deeper layers."""

import pytest
import torch

from framework import hooks
from framework.config import ConfigError, ModelConfig
from framework.llm import load_frozen

ARCHS = ["tiny-gpt2", "tiny-gpt_neox", "tiny-llama", "tiny-bert"]
KINDS = sorted(hooks.SITE_KINDS)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return load_frozen(ModelConfig(name=request.param, device="cpu"))[0]


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layer", [0, 2])
def test_early_stop_equals_full_forward(model, layer):
    specs = [hooks.parse_site(f"blocks.{layer}.{kind}") for kind in KINDS]
    ids = _ids()
    with hooks.capture(model, specs, stop_early=False) as full:
        model(input_ids=ids)
    full = dict(full)
    deeper = []
    blocks = model.get_submodule(hooks.layout_of(model).blocks)
    handle = blocks[layer + 1].register_forward_hook(lambda *a: deeper.append(1))
    with hooks.capture(model, specs, stop_early=True) as early:
        hooks.run_until_captured(lambda: model(input_ids=ids))
    handle.remove()
    assert not deeper, "the forward went past the last needed layer"
    assert set(early) == set(full) == {s.name for s in specs}
    for name in full:
        assert early[name].shape[:2] == (2, 12)
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


def test_resid_post_matches_hidden_states(model):
    ids = _ids()
    out = model(input_ids=ids, output_hidden_states=True)
    spec = hooks.parse_site("blocks.1.resid_post")
    with hooks.capture(model, [spec], stop_early=True) as got:
        hooks.run_until_captured(lambda: model(input_ids=ids))
    torch.testing.assert_close(got[spec.name], out.hidden_states[2])
    spec0 = hooks.parse_site("blocks.1.resid_pre")
    with hooks.capture(model, [spec0]) as got:
        hooks.run_until_captured(lambda: model(input_ids=ids))
    torch.testing.assert_close(got[spec0.name], out.hidden_states[1])


def test_splice_identity_changes_nothing_and_zero_changes_output():
    model = load_frozen(ModelConfig(name="tiny-llama", device="cpu"))[0]
    ids = _ids()
    clean = model(input_ids=ids).logits
    for kind in KINDS:
        spec = hooks.parse_site(f"blocks.1.{kind}")
        with hooks.splice(model, spec, lambda a: a):
            same = model(input_ids=ids).logits
        torch.testing.assert_close(same, clean)
        with hooks.splice(model, spec, torch.zeros_like):
            zeroed = model(input_ids=ids).logits
        assert not torch.allclose(zeroed, clean), kind


def test_names_and_errors():
    assert hooks.parse_site("blocks.3.hook_resid_post").kind == "resid_post"
    assert hooks.parse_site("blocks.3.mlp_in").tl_name == "blocks.3.ln2.hook_normalized"
    assert hooks.parse_site("blocks.3.attn_out").tl_name == "blocks.3.hook_attn_out"
    assert hooks.parse_site("blocks.3.attn.hook_z").kind == "attn_z"
    spec = hooks.parse_site("module:model.layers.1.mlp.down_proj")
    assert spec.module_path == "model.layers.1.mlp.down_proj" and spec.read == "output"
    with pytest.raises(ConfigError, match="unknown hook site"):
        hooks.parse_site("blocks.1.resid")
    model = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"))[0]
    with pytest.raises(ConfigError, match="layer 9 out of range, model has 4 layers"):
        hooks.resolve(model, hooks.parse_site("blocks.9.resid_post"))
    with pytest.raises(ConfigError, match="has no module"):
        hooks.resolve(model, hooks.parse_site("module:transformer.h.0.nope"))


def test_raw_module_site_reads_input_and_output():
    model = load_frozen(ModelConfig(name="tiny-llama", device="cpu"))[0]
    ids = _ids()
    specs = [hooks.parse_site("module:model.layers.0.mlp"), hooks.parse_site("module_input:model.layers.0.mlp"),
             hooks.parse_site("blocks.0.mlp_out"), hooks.parse_site("blocks.0.mlp_in")]
    with hooks.capture(model, specs) as got:
        hooks.run_until_captured(lambda: model(input_ids=ids))
    torch.testing.assert_close(got[specs[0].name], got[specs[2].name])
    torch.testing.assert_close(got[specs[1].name], got[specs[3].name])


def test_attn_z_is_the_concatenated_heads_that_the_output_projection_maps_to_attn_out(model):
    ids = _ids()
    specs = [hooks.parse_site("blocks.1.attn_z"), hooks.parse_site("blocks.1.attn_out")]
    with hooks.capture(model, specs) as got:
        hooks.run_until_captured(lambda: model(input_ids=ids))
    layout = hooks.layout_of(model)
    block = model.get_submodule(layout.blocks)[1]
    proj = block.get_submodule(layout.attn_z)
    assert got[specs[0].name].shape[-1] == model.config.hidden_size  # n_heads * d_head
    torch.testing.assert_close(proj(got[specs[0].name]), got[specs[1].name])


def test_local_folder_loads_with_accelerate_device_map(tmp_path):
    from framework.llm import check_model_name

    model, tok = load_frozen(ModelConfig(name="tiny-llama", device="cpu"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    check_model_name(str(tmp_path / "m"))
    loaded, _ = load_frozen(ModelConfig(name=str(tmp_path / "m"), device_map="cpu"))
    assert next(loaded.parameters()).device.type == "cpu" and not loaded.training
    ids = _ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_model_name(str(tmp_path))
