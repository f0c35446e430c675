"""Command line: `sparsemill train CONFIG.yaml [dotted.key=value ...]`, `sparsemill cache CONFIG.yaml [...]`
(an activation store, framework/store.py), `sparsemill export RUN_DIR`, `sparsemill inspect RUN_DIR`,
`sparsemill evaluate CONFIG --sae FOLDER...`, `sparsemill calibrate CONFIG --sae FOLDER...`,
`sparsemill circuit-tracer EXPORT_FOLDER... --out DIR`, and the study commands of framework/studies.py
(`sparsemill circuits CONFIG`, `sparsemill evaluate-supervised CONFIG`). Every subcommand has an example
in EXAMPLES, which `sparsemill --help` lists."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from framework.errors import DataError, UserError
from framework.schema import RunConfig
from framework.studies import STUDY_COMMANDS

DEBUG_ENV = "SPARSEMILL_DEBUG"  # =1: tracebacks for user errors too

TRAIN_EPILOG = """\
Overrides use dotted keys into the YAML (values are parsed as YAML):
  sparsemill train configs/debug.yaml saes.0.k=64 train.total_tokens=200000 run_dir=runs/x

Every key (section.key: type = default):
"""


# subcommand -> an example invocation (`sparsemill --help` lists them all; a test checks none is missing)
EXAMPLES = {
    "train": "sparsemill train configs/debug.yaml saes.0.k=64 --run-dir runs/x",
    "cache": "sparsemill cache configs/debug.yaml data.store_dir=stores/debug",
    "export": "sparsemill export runs/x --checkpoint step_00001000",
    "inspect": "sparsemill inspect runs/x --json",
    "evaluate": "sparsemill evaluate configs/debug.yaml --sae runs/x/export/resid path/to/saelens_folder",
    "calibrate": "sparsemill calibrate configs/debug.yaml --sae runs/x/export/tc --out runs/x/export_jumprelu",
    "circuit-tracer": "sparsemill circuit-tracer runs/x/export/tc0 runs/x/export/tc1 --out transcoders/x",
    "circuits": "sparsemill circuits configs/circuits_ioi_smollm2.yaml",
    "evaluate-supervised": "sparsemill evaluate-supervised configs/supervised_ioi_smollm2.yaml",
}


def _examples() -> str:
    width = max(map(len, EXAMPLES))
    return "examples:\n" + "\n".join(f"  {name.ljust(width)}  {cmd}" for name, cmd in EXAMPLES.items())


def _describe(cls, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += _describe(tp, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            lines += _describe(typing.get_args(tp)[0], f"{prefix}{f.name}.N.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix}{f.name}: {getattr(tp, '__name__', str(tp))} = {default!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsemill",
        description="Train TopK sparse autoencoders and transcoders on activations of a frozen language model.",
        epilog=_examples(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help=f"show the traceback of every error (or {DEBUG_ENV}=1)")
    p_train = sub.add_parser(
        "train", help="train the SAEs a YAML config describes",
        description="Train one or several SAEs from one activation stream; writes checkpoints, SAELens exports, "
                    "TensorBoard logs, eval.json and summary.json into run_dir.",
        epilog=TRAIN_EPILOG + "\n".join(_describe(RunConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
    )
    p_train.add_argument("config", help="YAML config file (see configs/)")
    p_train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. saes.0.k=64")
    p_train.add_argument("--run-dir", help="shorthand for run_dir=...")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p_train.add_argument("--no-resume", action="store_true",
                         help="start fresh even if run_dir holds a checkpoint (default: resume exactly from the newest "
                              "valid one; the earlier checkpoints are then moved to run_dir/checkpoints.previous-*)")
    p_export = sub.add_parser(
        "export", help="write SAELens folders from a checkpoint", parents=[common],
        description="Consolidate a checkpoint (any strategy, placement or world size) into one SAELens-format folder "
                    "per SAE (cfg.json + sae_weights.safetensors, normalisation folded into the weights). The "
                    "checkpoint is verified against its manifest first.")
    p_export.add_argument("run_dir", help="run directory (holds checkpoints/)")
    p_export.add_argument("--checkpoint", help="checkpoint name, e.g. step_00001000 (default: the newest valid one)")
    p_export.add_argument("--out", help="output folder (default: RUN_DIR/export/<checkpoint name>)")
    p_inspect = sub.add_parser(
        "inspect", help="list a run's checkpoints", parents=[common],
        description="List the checkpoints of a run: step, tokens, validity (every file checked against the "
                    "manifest's size and sha256), the layout that wrote them, and eval metrics when present.")
    p_inspect.add_argument("run_dir", help="run directory (holds checkpoints/)")
    p_inspect.add_argument("--json", action="store_true", help="print the rows as JSON")
    p_ct = sub.add_parser(
        "circuit-tracer", help="write a circuit-tracer transcoder set from export folders", parents=[common],
        description="Write circuit-tracer's transcoder-set layout (layer_<L>.safetensors + config.yaml) from the "
                    "SAELens export folders of MLP transcoders (blocks.L.mlp_in -> blocks.L.mlp_out), one per layer "
                    "from 0 up. Load it with circuit_tracer.utils.caching.load_transcoders_from_cache(NAME, "
                    "cache_dir=PARENT) where --out is PARENT/NAME.")
    p_ct.add_argument("folders", nargs="+", help="export folders, e.g. RUN_DIR/export/<sae>")
    p_ct.add_argument("--out", required=True, help="output folder")
    p_ct.add_argument("--scan", default="", help="circuit-tracer's scan name (default: the folder's name)")
    p_cache = sub.add_parser(
        "cache", help="write an activation store: the frozen LLM's activations at every configured site",
        description="Run the frozen LLM over the config's text (data.*) and write every configured SAE site as "
                    "row-aligned shards into data.store_dir, with a manifest (checksums, rows, provenance, held-out "
                    "split). Resumes after a kill; under torchrun every rank writes its own shards. Train from it "
                    "with data.source=store.", parents=[common])
    p_cache.add_argument("config", help="YAML config file (see configs/)")
    p_cache.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.store_dir=stores/x")
    p_cache.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    for name, help_, description in (
            ("evaluate", "evaluate SAELens-format folders (ours or SAELens') with our metrics",
             "Evaluate SAELens-format folders (written by sparsemill or by SAELens' save_model) on the config's model "
             "and held-out data: FVU (eval-set mean), L0, dead/dense fractions, and with an LLM delta CE, KL and CE "
             "recovered (eval.* keys set the token counts). Folders SAELens can load are evaluated through SAELens. "
             "Prints a table; writes RUN_DIR/evaluate.json (run_dir from the config)."),
            ("calibrate", "write the closest SAELens option for exports SAELens cannot load",
             "For sparsemill exports no SAELens architecture computes (TopK/AbsTopK transcoders, top-AFA), write a "
             "SAELens JumpReLU folder with per-latent thresholds calibrated on eval.tokens held-out tokens of the "
             "config's data, and report its measured error (FVU against ours) in cfg.json metadata.")):
        p_folder = sub.add_parser(name, help=help_, description=description, parents=[common])
        p_folder.add_argument("config", help="YAML config file: model and data (its saes are ignored)")
        p_folder.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. eval.tokens=4096")
        p_folder.add_argument("--sae", nargs="+", required=True, metavar="FOLDER", help="SAELens-format folders")
        p_folder.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
        if name == "calibrate":
            p_folder.add_argument("--out", help="output parent folder (default: beside each, <name>_jumprelu)")
    for name, study in STUDY_COMMANDS.items():
        p_study = sub.add_parser(name, help=study.help, description=study.description, parents=[common])
        p_study.add_argument("config", help="YAML config file (see configs/)")
        p_study.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args, extra = parser.parse_known_args(argv)  # overrides may follow options
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and args.command not in ("train", "cache", "evaluate", "calibrate", *STUDY_COMMANDS)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet or args.command not in ("train", "cache") else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args, extra)
    except UserError as err:
        if args.debug or os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code


def _train_command(args, extra: list[str]) -> int:
    from framework import watchdog  # noqa: PLC0415

    watchdog.die_with_launcher()  # a torchrun worker ends with its agent, even if killed with kill -9
    overrides = list(args.overrides) + extra + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    if args.quiet:
        overrides.append("log.progress=false")
    if args.no_resume:
        overrides.append("train.resume=false")
    from framework.config import load_config  # noqa: PLC0415  (the registries it checks against import torch)

    cfg = load_config(args.config, overrides)
    from framework.preemption import PREEMPTED_EXIT_CODE, Preempted  # noqa: PLC0415
    from framework.train import format_summary, train  # noqa: PLC0415  (heavy imports after validation)

    try:
        summary = train(cfg)
    except Preempted as stop:
        print(f"preempted: {stop}; rerun the same command to resume (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Exception as err:  # a lost rank or a timeout: one clear paragraph instead of a traceback
        if not watchdog.is_distributed_failure(err):
            raise
        print(watchdog.describe_failure(err), file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"run directory: {cfg.run_dir}")
        for s in cfg.saes:
            print(f"exported {s.name}: {os.path.join(cfg.run_dir, 'export', s.name)}")
        if cfg.log.tensorboard:
            print(f"TensorBoard: tensorboard --logdir {os.path.join(cfg.run_dir, 'tensorboard')}")
    return 0


def _cache_command(args, extra: list[str]) -> int:
    from framework.config import load_cache_config  # noqa: PLC0415

    cfg = load_cache_config(args.config, list(args.overrides) + extra + (["log.progress=false"] if args.quiet else []))
    from framework.store import cache, format_cache_summary  # noqa: PLC0415  (heavy imports after validation)

    print(format_cache_summary(cache(cfg, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))))
    return 0


def _checkpoint_command(args, extra: list[str]) -> int:
    import json  # noqa: PLC0415

    from framework import export  # noqa: PLC0415

    if args.command == "inspect":
        rows = export.inspect_run(args.run_dir)
        print(json.dumps(rows, indent=2) if args.json else export.format_inspection(args.run_dir, rows))
        return 0 if rows else 1
    for folder in export.export_checkpoint(args.run_dir, args.checkpoint, args.out):
        print(f"exported {folder}")
    return 0


def _circuit_tracer_command(args, extra: list[str]) -> int:
    from framework import export  # noqa: PLC0415

    try:
        print(f"wrote {export.export_circuit_tracer(args.folders, args.out, args.scan)}")
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"circuit-tracer export: {err}") from None
    return 0


def _folders_command(args, extra: list[str]) -> int:
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from framework.config import load_config  # noqa: PLC0415

    cfg = load_config(args.config, list(args.overrides) + extra)
    from framework import folders  # noqa: PLC0415  (torch, the model)

    if args.command == "calibrate":
        result = folders.calibrate_folders(cfg, args.sae, args.out)
        keys = ("relative_error", "l0_original", "l0_approximation")
    else:
        result = folders.evaluate_folders(cfg, args.sae)
        keys = ("fvu", "l0", "dead_frac", "dense_frac", "delta_ce", "kl", "ce_recovered")
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "evaluate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else folders.format_table(result, keys))
    return 0


def _study_command(args, extra: list[str]) -> int:
    return STUDY_COMMANDS[args.command].run(args.config, list(args.overrides) + extra)


COMMANDS = {"train": _train_command, "cache": _cache_command, "export": _checkpoint_command,
            "inspect": _checkpoint_command, "circuit-tracer": _circuit_tracer_command, "evaluate": _folders_command,
            "calibrate": _folders_command, **dict.fromkeys(STUDY_COMMANDS, _study_command)}


if __name__ == "__main__":
    sys.exit(main())
