"""`sparsemill evaluate CONFIG --sae FOLDER...` on folders SAELens itself wrote (save_model) and
on one of ours SAELens cannot load, on a tiny model built from a config: SAEs whose answers
are known (the identity, the zero map) pin the metrics; `sparsemill calibrate` writes a JumpReLU
folder SAELens loads; and `--help` shows an example of every subcommand."""

import json

import pytest
import torch
import yaml

from framework import export
from framework.cli import COMMANDS, EXAMPLES, main
from framework.kinds import build_sae

D = 64  # tiny-llama's hidden size
SITE_HOOK = "blocks.1.hook_resid_post"


def _config(tmp_path, text_dir):
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name": "tiny-llama", "device": "cpu"},
           "data": {"paths": [str(text_dir)], "context_size": 32, "llm_batch_size": 8},
           "saes": [{"name": "unused", "site": "blocks.1.resid_post", "n_latents": 8, "k": 2}],
           "eval": {"tokens": 512, "splice_tokens": 256}, "train": {"device": "cpu"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _saelens_folder(path, decoder_scale: float):
    """A SAELens standard (ReLU) SAE: W_enc = [I, -I], W_dec = scale * [I; -I], so it maps x to
    scale * x (the identity for 1, zero for 0), written by SAELens itself."""
    from sae_lens import StandardSAE, StandardSAEConfig  # noqa: PLC0415
    from sae_lens.saes.sae import SAEMetadata  # noqa: PLC0415

    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=2 * D, metadata=SAEMetadata(hook_name=SITE_HOOK,
                                                                                    model_name="tiny-llama")))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(decoder_scale * torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(path)
    return path


def test_evaluate_saelens_written_and_own_folders(tmp_path, text_dir, capsys):
    identity = _saelens_folder(tmp_path / "identity", 1.0)
    zero = _saelens_folder(tmp_path / "zero", 0.0)
    tc = build_sae("topk", D, 32, 4, d_out=D, seed=0)  # a TopK transcoder: SAELens has no architecture for it
    own = export.export_sae(tc, tmp_path / "tc", "topk", {"hook_name": "blocks.0.ln2.hook_normalized",
                                                           "hook_name_out": "blocks.0.hook_mlp_out"})
    assert main(["evaluate", str(_config(tmp_path, text_dir)), "--sae", str(identity), str(zero), str(own)]) == 0
    table = capsys.readouterr().out
    assert "identity" in table and "ce_recovered" in table
    result = json.loads((tmp_path / "run" / "evaluate.json").read_text())
    ident, nothing, mine = result["identity"], result["zero"], result["tc"]
    assert ident["loaded_by"] == nothing["loaded_by"] == "sae_lens" and mine["loaded_by"] == "sparsemill"
    assert ident["fvu"] < 1e-10 and abs(ident["l0"] - D) < 1e-9 and ident["dead_frac"] == 0
    assert abs(ident["delta_ce"]) < 1e-5 and ident["kl"] < 1e-6 and abs(ident["ce_recovered"] - 1) < 1e-4
    assert nothing["fvu"] > 1 and abs(nothing["ce_recovered"]) < 1e-6 and nothing["ce_spliced"] > nothing["ce_clean"]
    assert 0 < mine["l0"] <= 4 and mine["eval_tokens"] == ident["eval_tokens"] > 0


def test_calibrate_writes_a_jumprelu_folder_saelens_loads(tmp_path, text_dir, capsys):
    from sae_lens import SAE  # noqa: PLC0415

    tc = build_sae("topk", D, 32, 4, d_out=D, seed=0)
    own = export.export_sae(tc, tmp_path / "tc", "topk", {"hook_name": "blocks.0.ln2.hook_normalized",
                                                           "hook_name_out": "blocks.0.hook_mlp_out"})
    assert main(["calibrate", str(_config(tmp_path, text_dir)), "--sae", str(own), "--out", str(tmp_path / "cal"),
                 "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)["tc"]
    assert measured["architecture"] == "jumprelu_transcoder" and 0 <= measured["relative_error"] < 1
    loaded = SAE.load_from_disk(str(tmp_path / "cal" / "tc"))
    meta = json.loads((tmp_path / "cal" / "tc" / "cfg.json").read_text())["metadata"]
    assert type(loaded).__name__ == "JumpReLUTranscoder" and meta["sparsemill_approximation"]["of_kind"] == "topk"


def test_calibrate_refuses_what_saelens_loads_exactly(tmp_path, text_dir, capsys):
    folder = _saelens_folder(tmp_path / "identity", 1.0)
    assert main(["calibrate", str(_config(tmp_path, text_dir)), "--sae", str(folder)]) == 2
    assert "exactly already" in capsys.readouterr().err


def test_help_lists_every_subcommand_with_an_example(capsys):
    assert set(EXAMPLES) == set(COMMANDS)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, example in EXAMPLES.items():
        assert name in out and example in out


def test_evaluate_names_a_folder_it_cannot_use(tmp_path, text_dir, capsys):
    cfg = str(_config(tmp_path, text_dir))
    assert main(["evaluate", cfg, "--sae", str(tmp_path / "nowhere")]) == 2
    assert "missing cfg.json" in capsys.readouterr().err
    folder = export.export_sae(build_sae("topk", D, 8, 2), tmp_path / "nohook", "topk", {})
    assert main(["evaluate", cfg, "--sae", str(folder)]) == 2
    assert "metadata.hook_name is empty" in capsys.readouterr().err
