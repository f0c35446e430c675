"""Config and outputs of the study commands (`sparsemill circuits`, `sparsemill
evaluate-supervised`), whose configs are not training runs: YAML + dotted overrides -> a typed
dataclass under the training config's rules (unknown keys fail with a suggestion, types are
checked), and the result JSON + resolved config written into its run_dir."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from framework.schema import build_dataclass, read_tree

T = TypeVar("T")


def load_study_config(cls: type[T], path: str | Path, overrides: list[str] = ()) -> T:
    cfg = build_dataclass(cls, read_tree(path, overrides))
    cfg.validate()
    return cfg


def write_outputs(cfg, result: dict, filename: str) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / filename).write_text(json.dumps(result, indent=2))
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return run_dir / filename
