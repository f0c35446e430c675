"""LLM-forward throughput with and without the early stop after the deepest hooked site.

    python -m framework.benchmarks.llm_forward configs/smollm2_main.yaml [--batches 6]

Prints tokens/s for (a) a full forward (all layers + LM head) with the same hooks recording,
and (b) the forward that stops after the last needed site, on the config's text and model.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from framework import hooks
from framework.activations import LLMSource
from framework.config import load_config
from framework.llm import load_frozen


def _tokens_per_s(source: LLMSource, batches: list[torch.Tensor], stop_early: bool) -> float:
    start = time.perf_counter()
    for ids in batches:
        with torch.no_grad(), hooks.capture(source.model, source.specs, stop_early=stop_early):
            hooks.run_until_captured(lambda: source.model(input_ids=ids, use_cache=False))
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    model, tokenizer = load_frozen(cfg.model)
    sites = sorted({s.site for s in cfg.saes} | {s.output_site for s in cfg.saes if s.output_site})
    source = LLMSource(cfg.data, model, tokenizer, sites, torch.device("cpu"), cfg.train.seed)
    batches = list(itertools.islice(source.sequences("train"), args.batches + 1))
    _tokens_per_s(source, batches[:1], True)  # warm-up
    full = _tokens_per_s(source, batches[1:], stop_early=False)
    early = _tokens_per_s(source, batches[1:], stop_early=True)
    print(f"model={cfg.model.name} sites={sites} layers={hooks.num_layers(model)} "
          f"tokens/forward={batches[1].numel()} threads={torch.get_num_threads()}")
    print(f"full forward (all layers + LM head): {full:10,.0f} tokens/s")
    print(f"early stop after the last site:      {early:10,.0f} tokens/s   ({early / full:.2f}x)")


if __name__ == "__main__":
    main()
