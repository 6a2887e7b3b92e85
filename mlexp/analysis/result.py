"""What `compare` found: the runs, groups, pairs and comparisons, and what it left out and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlexp.analysis.comparisons import Metric
from mlexp.analysis.scores import ACCURACY, Score


@dataclass
class CompareResult:
    experiments: dict[str, str]            # id -> name
    filter_string: str | None
    group_by: list[str]
    runs: pd.DataFrame                     # one row per finished training run
    groups: pd.DataFrame                   # one row per group: runs, <metric>_mean, <metric>_std
    pairs: pd.DataFrame                    # one row per matched pretrained/scratch pair
    comparisons: pd.DataFrame              # every paired comparison (mlexp.analysis.comparisons), Holm-adjusted
    metric: Metric                         # what the comparisons compare
    excluded: list[dict[str, Any]]         # training runs left out of the statistics, and why
    ignored: dict[str, int] = field(default_factory=dict)  # kind -> count of runs that are not training runs
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)  # key -> group, epoch, n, mean, low, high
    diff_curves: pd.DataFrame = field(default_factory=pd.DataFrame)  # backbone, epoch, n, mean, low, high
    equal_budget: bool = False
    lacking_metric: list[str] = field(default_factory=list)  # runs without the compared metric (left out of it)
    features: list = field(default_factory=list)   # mlexp.analysis.features.FeatureComparison per backbone
    arm_pairs: list = field(default_factory=list)  # mlexp.analysis.arms.ArmPair per --pair (rows of kind pair)
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None              # the MLflow run the outputs were logged to
    reads: dict[str, Any] = field(default_factory=dict)  # which MLflow doors answered (mlflow_internals)
    score: Score = ACCURACY                # what the runs' task is measured by (a detector's: mAP)
