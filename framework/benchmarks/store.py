"""Activation store throughput and size: cache once, then train from the store vs from the LLM.

    python -m framework.benchmarks.store configs/debug.yaml [overrides] [--dir DIR]

Caches the config's sites in float32 and bfloat16 (`sparsemill cache`), then trains the
config's SAEs from the LLM (data.source=text) and from the float32 store (data.source=store),
and prints cache tokens/s against the LLM source's own rate (tokenise + forward), training
tokens/s for both sources, and the store's bytes per million tokens per site for each dtype.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from framework.config import load_cache_config, load_config
from framework.store import cache
from framework.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--dir", help="where stores and runs go (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="store_bench_"))
    quiet = ["log.progress=false", "log.tensorboard=false", "train.resume=false"]
    caches = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_cache_config(args.config, [*args.overrides, *quiet, f"data.store_dir={root / dtype}",
                                              f"cache.dtype={dtype}", f"run_dir={root / 'unused'}"])
        caches[dtype] = cache(cfg)
    runs = {}
    for source in ("text", "store"):
        cfg = load_config(args.config, [*args.overrides, *quiet, f"data.source={source}",
                                         f"data.store_dir={root / 'float32'}", f"run_dir={root / ('run_' + source)}"])
        runs[source] = train(cfg)
    c = caches["float32"]
    print(f"{'cache (float32) write':<34}{c['tokens_per_s']:>12,.0f} tokens/s   ({c['rows_this_run']:,} rows, "
          f"{len(c['sites'])} sites)")
    print(f"{'  of which LLM source (tok+fwd)':<34}{c['forward_tokens_per_s']:>12,.0f} tokens/s")
    print(f"{'  of which shard writes':<34}{c['write_tokens_per_s']:>12,.0f} tokens/s")
    for source, s in runs.items():
        print(f"{'train from ' + source:<34}{s['tokens_per_s']:>12,.0f} tokens/s   ({s['tokens']:,} tokens)")
    for dtype, s in caches.items():
        per_site = s["bytes"] / (s["rows"]["train"] + s["rows"]["eval"]) / len(s["sites"]) * 1e6
        print(f"{'store size ' + dtype:<34}{per_site / 2**20:>12,.1f} MiB per million tokens per site "
              f"(widths {sorted(set(s['sites'].values()))})")
    print(f"stores and runs in {root}")


if __name__ == "__main__":
    main()
