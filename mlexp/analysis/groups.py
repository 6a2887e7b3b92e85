"""Per group of runs: the metric summary table (mean, interval, median, IQM), and the curves
of `val/acc` and `val/loss` with their bands, and of the pretraining gain over epochs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mlexp.analysis import stats
from mlexp.analysis.comparisons import MATCH, Metric, pair_up
from mlexp.analysis.query import RunRecord
from mlexp.analysis.scores import ACCURACY, Score

# Per-run quantities aggregated per group (mean and std of each).
RUN_METRICS = ["best_val_acc", "final_val_acc", "final_train_acc", "overfit_gap", "total_time_s",
               "epoch_time_s", "trainable_params", "epochs_run", "epochs_to_95", "gain_5"]


METRIC_SUMMARY = ["n", "mean", "std", "ci_low", "ci_high", "median", "iqm"]


def metric_values(runs: pd.DataFrame, records: list[RunRecord], metric: Metric, score: Score = ACCURACY
                  ) -> pd.Series:
    """Each run's value of the compared metric (NaN where a run lacks it)."""
    if metric.key == score.best:  # best_val_acc holds the score's best (or the highest of its curve)
        return runs["best_val_acc"].astype(float)
    latest = {run.run_id: run.metrics.get(metric.key, math.nan) for run in records}
    return pd.Series([latest.get(run_id, math.nan) for run_id in runs["run_id"]], index=runs.index, dtype=float)


def group_table(runs: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """runs, the mean and sample std (ddof=1; NaN for one run) of every per-run quantity, and
    the compared metric's n, mean, std, 95% bootstrap interval, median and IQM (metric_*)."""
    columns = ["runs"] + [f"{m}_{s}" for m in RUN_METRICS for s in ("mean", "std")]
    if runs.empty:
        return pd.DataFrame(columns=[*group_by, *columns, *(f"metric_{name}" for name in METRIC_SUMMARY)])
    grouped = runs.groupby(group_by, dropna=False, sort=True)
    table = grouped[RUN_METRICS].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table.insert(0, "runs", grouped.size())
    summaries = grouped["value"].apply(lambda values: pd.Series(stats.describe(values).__dict__)).unstack()
    table = table.join(summaries[METRIC_SUMMARY].add_prefix("metric_"))
    return table.reset_index()


def group_label(row: pd.Series | dict, group_by: list[str]) -> str:
    return "/".join(str(row[name]) for name in group_by)


def band(values: np.ndarray) -> tuple[int, float, float, float]:
    """n, mean and a 95% t interval of one epoch's values (the curves' band; NaN below 2 runs).
    A t band, not a bootstrap one: it is drawn per epoch and group, thousands of times on big sweeps."""
    from scipy.special import stdtrit  # Student t quantile (scipy.special: no scipy.stats import)

    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return n, mean, math.nan, math.nan
    half = float(stdtrit(n - 1, 0.975)) * float(values.std(ddof=1)) / math.sqrt(n)
    return n, mean, mean - half, mean + half


def banded_curves(runs: pd.DataFrame, points_by_run: dict, group_by: list[str]) -> pd.DataFrame:
    """group, epoch, n, mean, low, high: a per-epoch metric over each group's runs."""
    columns = ["group", "epoch", "n", "mean", "low", "high"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    labels = {run_id: group_label(row, group_by) for run_id, row in zip(runs["run_id"], runs.to_dict("records"))}
    long = [(labels[run_id], step, value) for run_id, points in points_by_run.items() if run_id in labels
            for step, value in points]
    if not long:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(long, columns=["group", "epoch", "value"])
    rows = [(group, epoch, *band(values.to_numpy(dtype=float)))
            for (group, epoch), values in frame.groupby(["group", "epoch"], sort=True)["value"]]
    return pd.DataFrame(rows, columns=columns)


def difference_curves(runs: pd.DataFrame, val_acc: dict) -> pd.DataFrame:
    """backbone, epoch, n, mean, low, high: pretrained minus scratch val/acc per epoch, over the
    pairs matched on dataset, strategy, seed and fold."""

    columns = ["backbone", "epoch", "n", "mean", "low", "high"]
    rows = []
    for arch, mine in runs.groupby("_arch", sort=True):
        pairs = pair_up(mine, "_init", "pretrained", "scratch", ["_strategy", *MATCH])
        by_epoch: dict[int, list[float]] = {}
        for run_a, run_b in zip(pairs["run_id_a"], pairs["run_id_b"]):
            scratch = dict(val_acc.get(run_b, []))
            for epoch, value in val_acc.get(run_a, []):
                if epoch in scratch:
                    by_epoch.setdefault(epoch, []).append(value - scratch[epoch])
        rows += [(arch, epoch, *band(np.array(values))) for epoch, values in sorted(by_epoch.items())]
    return pd.DataFrame(rows, columns=columns)
