"""Config errors name the key, suggest the closest valid one, and happen before any model loads."""

import pytest

from framework.config import ConfigError, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
model: {name: tiny-gpt2}
data: {paths: [%s]}
saes:
  - {site: blocks.1.resid_post, n_latents: 64, k: 4}
"""


@pytest.fixture
def base(tmp_path, text_dir):
    return _write(tmp_path, BASE % text_dir)


def test_valid_config_and_overrides(base):
    cfg = load_config(base, ["saes.0.k=8", "train.total_tokens=2048", "train.adam_betas=[0.8, 0.9]"])
    assert cfg.saes[0].k == 8 and cfg.train.total_tokens == 2048 and cfg.train.adam_betas == [0.8, 0.9]
    assert cfg.saes[0].name == "blocks_1_resid_post"  # a default name derived from the site


@pytest.mark.parametrize("override,fragment", [
    ("train.totl_tokens=5", "did you mean 'total_tokens'"),
    ("saes.0.n_latent=5", "did you mean 'n_latents'"),
    ("saes.0.k=0", "saes.0.k: must be in [1, n_latents=64]"),
    ("saes.0.k=65", "saes.0.k: must be in [1, n_latents=64]"),
    ("saes.0.k=abc", "saes.0.k: expected int"),
    ("saes.0.site=blocks.1.resid_pst", "did you mean 'resid_post'"),
    ("saes.0.kind=topkk", "did you mean 'topk'"),
    ("model.name=tiny-gpt3", "unknown tiny model"),
    ("model.name=/no/such/model", "unknown model"),
    ("data.paths=[/no/such/dir]", "matches no file"),
    ("train.optimizer=adamw", "train.optimizer"),
    ("saes.3.k=4", "index 3 out of range"),
    ("train.buffer_tokens=10", "train.buffer_tokens"),
    ("data.source=activations", "data.activations_dir"),
])
def test_bad_values_name_the_key(base, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(base, [override])
    assert fragment in str(err.value)


def test_unknown_top_level_key(tmp_path, text_dir):
    p = _write(tmp_path, BASE % text_dir + "trian: {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*did you mean 'train'"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_error_without_loading(base, capsys):
    from framework.cli import main

    assert main(["train", str(base), "saes.0.k=1000"]) == 2
    assert "saes.0.k" in capsys.readouterr().err


def test_cli_help_lists_every_key(capsys):
    from framework.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("saes.N.k:", "train.total_tokens:", "data.context_size:", "eval.splice_tokens:", "model.name:"):
        assert key in out
