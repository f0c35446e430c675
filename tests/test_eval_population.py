"""The splice metrics (ΔCE, KL, CE recovered) and the reconstruction metrics (FVU, L0, dead)
measure one token population: splicing replaces exactly the positions whose activations reach
the SAEs (not special, finite, not a norm outlier); and the source's skip counters count each
row once per split and survive a checkpoint."""

from contextlib import contextmanager

import torch

from framework import evaluate, hooks, text_data
from framework.activations import LLMSource
from framework.config import DataConfig, ModelConfig
from framework.llm import load_frozen

SITE = "blocks.1.resid_post"


def _source(text_dir, factor: float) -> LLMSource:
    model, tok = load_frozen(ModelConfig(name="tiny-gpt2", device="cpu"))
    data = DataConfig(paths=[str(text_dir)], context_size=24, llm_batch_size=4, norm_outlier_factor=factor)
    return LLMSource(data, model, tok, [SITE], torch.device("cpu"), seed=0)


class _ZeroSAE:
    """Reconstructs nothing: splicing it in zero-ablates the spliced positions."""

    def reconstruct(self, x):
        return torch.zeros_like(x)

    def splice_predictor(self):
        return self.reconstruct


class _Trainer:
    input_site = output_site = SITE

    @contextmanager
    def evaluating(self):
        yield _ZeroSAE()


def test_sae_positions_are_the_rows_the_source_yields(text_dir):
    src = _source(text_dir, factor=1.1)  # ~ the upper part of every batch's norms are outliers
    ids = next(src.sequences("eval"))
    rows = sum(b[SITE].shape[0] for b in _batches_of(src, ids))
    positions = src.sae_positions(ids)
    keep = text_data.keep_mask(ids, src.specials, True)
    assert int(positions.sum()) == rows and int(positions.sum()) < int(keep.sum())  # outliers really were cut
    assert not (positions & ~keep).any()


def _batches_of(src, ids):
    """What `batches` yields for exactly this token batch."""
    keep = text_data.keep_mask(ids, src.specials, True)
    acts = {k: v[keep] for k, v in src.capture(ids).items()}
    yield src._clean(acts, dict.fromkeys(src.skipped["eval"], 0))


def test_splicing_replaces_only_the_positions_the_reconstruction_metrics_see(text_dir):
    src = _source(text_dir, factor=1.1)
    ids = next(src.sequences("eval"))
    positions = src.sae_positions(ids)
    metrics = evaluate.splice_metrics(src, {"z": _Trainer()}, ids.numel(), lambda t: t)["z"]
    assert metrics["ce_spliced"] == metrics["ce_zero_ablated"]

    def ce_with_zeros_at(mask):
        def replace(act):
            out = act.clone()
            out[mask] = 0
            return out
        with torch.no_grad(), hooks.splice(src.model, hooks.parse_site(SITE), replace):
            logits = src.model(input_ids=ids, use_cache=False).logits
        return (evaluate._next_token_ce(logits, ids) / ids[:, 1:].numel()).item()

    assert abs(metrics["ce_spliced"] - ce_with_zeros_at(positions)) < 1e-5
    every_kept = text_data.keep_mask(ids, src.specials, True)
    assert abs(ce_with_zeros_at(every_kept) - ce_with_zeros_at(positions)) > 1e-4  # the populations differ here


def test_skip_counters_count_rows_once_per_split_and_survive_a_checkpoint(tmp_path):
    import numpy as np

    from framework.activations import FileSource

    x = np.random.default_rng(0).standard_normal((600, 4)).astype(np.float32)
    x[::20, 0] = np.nan  # 30 bad rows
    np.save(tmp_path / "a.npy", x)
    cfg = DataConfig(source="activations", activations_dir=str(tmp_path), shuffle_files=False)
    src = FileSource(cfg, torch.device("cpu"), 0, eval_rows=200)
    for _ in range(3):  # three evaluations read the same 200 held-out rows: 10 bad ones
        sum(b["activations"].shape[0] for b in src.batches("eval"))
    assert src.skipped["eval"]["nonfinite"] == 10
    train = src.batches("train")
    assert sum(next(train)["activations"].shape[0] for _ in range(1)) == 400 - 20  # one chunk: all 400 train rows
    assert src.skipped["train"]["nonfinite"] == 20
    again = FileSource(cfg, torch.device("cpu"), 0, eval_rows=200)
    again.load_stream_state(src.stream_state())
    assert again.skipped["train"] == src.skipped["train"]
