"""What a tuning study is (mlexp.sweep.study): its arms, the training options every trial
shares, the search space, the sampler, pruner and budget; its name, which the same command
gives the same study."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlexp.config import BOOKKEEPING, TrainConfig
from mlexp.option_values import best_is_max
from mlexp.sweep.space import Dimension
from mlexp.tasks.kinds import task_of

EQUAL_BUDGET = {"scratch_lr_mult": 1.0, "scratch_epochs_mult": 1.0, "scratch_warmup_mult": 1.0, "scratch_wd_mult": 1.0}


@dataclass(frozen=True)
class Arm:
    backbone: str
    init: str
    strategy: str

    @property
    def label(self) -> str:
        return f"{self.backbone}_{self.init}-{self.strategy}"


@dataclass
class StudyPlan:
    base: TrainConfig                       # the training options every trial shares
    arms: list[Arm]
    space: list[Dimension]
    sampler: str = "tpe"
    seed: int = 0
    trials: int = 10                        # per arm
    pruner: str = "median"
    final_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    storage: str | None = None              # an Optuna RDB URL; None: a journal file under mlexp-output/tune/
    out_dir: Path = Path("mlexp-output/tune")
    worker: int = 0                         # which of the launcher's workers (--parallel) proposes: not the study's

    @property
    def name(self) -> str:
        """The study's name: the same command (arms, space, search, budget, data) is the same study."""
        shared = {k: v for k, v in self.base.to_dict().items() if k not in (*BOOKKEEPING, "workers")}
        what = {"arms": [arm.label for arm in self.arms], "space": [d.describe() for d in self.space],
                "sampler": self.sampler, "seed": self.seed, "trials": self.trials, "pruner": self.pruner,
                "base": shared}
        return "study-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def metric(self) -> str:
        """The epoch metric trials are judged and chosen by: --best-metric, or where that is left
        at its default, the task's primary metric (a detector's val/map), as its runs choose."""
        if self.base.task != "classification" and self.base.best_metric == "val/acc":
            return task_of(self.base).primary_metric
        return self.base.best_metric

    @property
    def higher_is_better(self) -> bool:
        """--best-mode, else the task's own say (a user's task may give it), else the metric's name."""
        task = task_of(self.base)
        if self.base.best_mode == "auto" and self.metric == task.primary_metric and hasattr(task, "higher_is_better"):
            return bool(task.higher_is_better)
        return best_is_max(self.metric, self.base.best_mode)

    def trial_config(self, arm: Arm, params: dict, seed: int | None = None) -> TrainConfig:
        return self.base.replace(backbone=arm.backbone, init=arm.init, strategy=arm.strategy,
                                 **EQUAL_BUDGET, **params, **({"seed": seed} if seed is not None else {}))

    def worst_case_epochs(self) -> int:
        return len(self.arms) * (self.trials + len(self.final_seeds)) * self.base.epochs
