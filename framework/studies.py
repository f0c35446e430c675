"""The study commands of the CLI: a config file in, a JSON result and a short table out. Each
entry names its config dataclass, its runner and its formatter; the heavy modules are imported
only when the command runs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Study:
    help: str
    description: str
    module: str  # holds `config_class`, `runner` and `formatter`
    config_class: str
    runner: str
    result_file: str  # written into the config's run_dir
    formatter: str = "format_result"

    def run(self, config_path: str, overrides: list[str]) -> int:
        from framework.study_config import load_study_config  # noqa: PLC0415

        mod = importlib.import_module(self.module)
        cfg = load_study_config(getattr(mod, self.config_class), config_path, overrides)  # errors: the CLI says them
        result = getattr(mod, self.runner)(cfg)
        print(getattr(mod, self.formatter)(result))
        print(f"wrote {Path(cfg.run_dir) / self.result_file}")
        return 0


STUDY_COMMANDS: dict[str, Study] = {
    "circuits": Study(
        help="rank attention heads for a task by discrete per-head SAE codes (and check against patching)",
        description="Train one small SAE per attention head on positive and negative prompts of a task file, score "
                    "each head by the share of its discrete codes unique to positives, and (patching.enabled) "
                    "compare the ranking with activation patching. Writes run_dir/ranking.json.",
        module="framework.circuits", config_class="CircuitsConfig", runner="run_circuits", result_file="ranking.json"),
    "evaluate-supervised": Study(
        help="evaluate a trained SAE against supervised feature dictionaries on a templated task",
        description="Build supervised dictionaries (centred mean activation per attribute value) at the SAE's site "
                    "and score the SAE on approximation, control and interpretability. Writes "
                    "run_dir/supervised_eval.json.",
        module="framework.supervised", config_class="SupervisedConfig", runner="run_supervised",
        result_file="supervised_eval.json"),
}
