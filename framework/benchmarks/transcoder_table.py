"""Per-layer transcoders vs skip transcoders vs a cross-layer transcoder, from one run's files:

    sparsemill train configs/smollm2_transcoders.yaml
    python -m framework.benchmarks.transcoder_table runs/smollm2_transcoders

Rows: every replacement set (`eval.replacement_sets`: per-layer transcoders spliced in at once)
and every CLT of the run, which all trained on the same tokens from one LLM forward. Columns:
  FVU L<n>  each layer's FVU of its MLP output (a set: its member on that layer; a CLT:
            `fvu.layer<n>`)
  ΔCE, KL   the replacement model: every covered MLP output replaced at once (eval.json)
  L0/layer  active latents per token and layer
  dead      fraction of latents that never fired on the held-out tokens
  tok/s     train tokens per second of the row's own SAE steps (a set: its members one after
            the other, 1 / Σ 1/rate; the LLM forward excluded: its rate is printed below)
  MiB       parameters + gradients + optimizer state (summary.json `sae_training`)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from framework import hooks
from framework.errors import DataError
from framework.kinds import SAE_KINDS


@dataclass
class Row:
    label: str
    fvu: dict[int, float]  # layer -> FVU
    delta_ce: float
    kl: float
    l0_per_layer: float
    dead: float
    tokens_per_s: float
    state_bytes: int


def _set_row(name: str, entry: dict, saes: dict, metrics: dict, training: dict) -> Row:
    members = entry["members"]
    layer = {m: hooks.parse_site(saes[m]["output_site"]).layer for m in members}
    latents = sum(saes[m]["n_latents"] for m in members)
    return Row(
        label=name,
        fvu={layer[m]: metrics[m]["fvu"] for m in members},
        delta_ce=entry.get("delta_ce", float("nan")), kl=entry.get("kl", float("nan")),
        l0_per_layer=sum(metrics[m]["l0"] for m in members) / len(members),
        dead=sum(metrics[m]["dead_frac"] * saes[m]["n_latents"] for m in members) / latents,
        tokens_per_s=1 / sum(1 / max(training[m]["tokens_per_s"], 1e-9) for m in members),
        state_bytes=sum(training[m]["state_bytes"] for m in members))


def _clt_row(name: str, m: dict, training: dict) -> Row:
    fvu = {int(k[len("fvu.layer"):]): v for k, v in m.items() if k.startswith("fvu.layer")}
    return Row(name, fvu, m.get("delta_ce", float("nan")), m.get("kl", float("nan")), m["l0"] / len(fvu),
               m["dead_frac"], training[name]["tokens_per_s"], training[name]["state_bytes"])


def table_rows(run_dir: Path) -> tuple[list[Row], dict]:
    """The rows of a finished run (summary.json, config.yaml), and the summary."""
    files = {name: run_dir / name for name in ("summary.json", "config.yaml")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"{run_dir}: not a finished run ({', '.join(missing)} missing); run `sparsemill train` first")
    summary = json.loads(files["summary.json"].read_text())
    saes = {s["name"]: s for s in yaml.safe_load(files["config.yaml"].read_text())["saes"]}
    metrics, training = summary["saes"], summary.get("sae_training", {})
    rows = [_set_row(name, entry, saes, metrics, training) for name, entry in summary.get("replacement_sets", {}).items()]
    rows += [_clt_row(name, metrics[name], training) for name, s in saes.items() if SAE_KINDS[s["kind"]].cross_layer]
    if not rows:
        raise DataError(f"{run_dir}: no replacement sets (eval.replacement_sets) and no CLT to tabulate")
    return rows, summary


def format_table(rows: list[Row], summary: dict) -> str:
    """A Markdown table, and the run's shared costs below it."""
    layers = sorted({L for r in rows for L in r.fvu})
    head = ["", *[f"FVU L{L}" for L in layers], "ΔCE", "KL", "L0/layer", "dead", "tok/s", "MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, *[f"{r.fvu[L]:.3f}" if L in r.fvu else "-" for L in layers], f"{r.delta_ce:.4f}",
                 f"{r.kl:.4f}", f"{r.l0_per_layer:.1f}", f"{r.dead:.3f}", f"{r.tokens_per_s:,.0f}",
                 f"{r.state_bytes / 2**20:,.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{summary['tokens']:,} train tokens from one LLM forward for every row; activations "
                 f"{summary.get('activation_tokens_per_s', 0):,.0f} tokens/s, the whole run "
                 f"{summary['tokens_per_s']:,.0f} tokens/s over {summary['train_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", type=Path, help="a finished run of `sparsemill train`")
    args = parser.parse_args(argv)
    try:
        rows, summary = table_rows(args.run_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
