"""Answer the research questions from the tracking server alone.

Does pretraining help this backbone, by how much (paired across seeds and folds, with a
95% confidence interval), which fine-tuning strategy wins, and at what cost in time and
trainable parameters? `compare()` queries MLflow, builds one row per finished training
run, aggregates per group and writes tables and plots; `run_compare()` is what the CLI and
the MLproject entry point call: it also logs the outputs to an MLflow run.

Accuracies are fractions (0..1) in the data and files, percentages in the printed tables.
Runs that are not FINISHED (RUNNING, FAILED, KILLED) are listed, never averaged in.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlexp.errors import MlexpError
from mlexp.query import FINISHED, RunRecord, fetch_runs, mlflow_client, resolve_experiments

DEFAULT_GROUP_BY = ["backbone", "init", "strategy"]
# Short names that mean mlexp's own tags (which, unlike the `backbone` param, carry no init suffix).
TAG_ALIASES = {"backbone": "mlexp.backbone", "init": "mlexp.init", "strategy": "mlexp.strategy",
               "dataset": "mlexp.dataset"}
CURVE_KEYS = ("val/acc", "val/loss")
PAIR_KEYS = ["dataset", "strategy", "seed", "fold"]  # what must match for a pretrained/scratch pair
CONVERGENCE_FRACTION = 0.95
EARLY_EPOCHS = 5
# Per-run quantities aggregated per group (mean and std of each).
RUN_METRICS = ["best_val_acc", "final_val_acc", "final_train_acc", "overfit_gap", "total_time_s",
               "epoch_time_s", "trainable_params", "epochs_run", "epochs_to_95", "gain_5"]
RESERVED = {"run_id", "run_name", *RUN_METRICS}


@dataclass
class CompareResult:
    experiments: dict[str, str]            # id -> name
    filter_string: str | None
    group_by: list[str]
    runs: pd.DataFrame                     # one row per finished training run
    groups: pd.DataFrame                   # one row per group: runs, <metric>_mean, <metric>_std
    pairs: pd.DataFrame                    # one row per matched pretrained/scratch pair
    pair_summary: pd.DataFrame             # per backbone (strategy "all") and per backbone x strategy
    excluded: list[dict[str, Any]]         # runs left out of the statistics, and why
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)  # key -> epoch x group mean
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None              # the MLflow run the outputs were logged to


def compare(client_or_uri: Any, experiments: list[str], filter_string: str | None = None,
            group_by: list[str] | None = None, out_dir: Path | str = "mlexp-compare",
            plots: bool = True) -> CompareResult:
    """Query the runs of `experiments`, compute the statistics, write tables and plots to out_dir."""
    from mlexp.compare_report import warm_up, write_outputs

    started = time.perf_counter()
    client = mlflow_client(client_or_uri)
    group_by = list(group_by or DEFAULT_GROUP_BY)
    if not experiments:
        raise MlexpError("name at least one experiment to compare (--experiment NAME)")
    names = resolve_experiments(client, experiments)
    warming = threading.Thread(target=warm_up, name="mlexp-plot-warm-up", daemon=True)
    if plots:
        warming.start()  # matplotlib's import and font loading overlap the server's work
    records, histories = fetch_runs(client, list(names), filter_string, CURVE_KEYS,
                                    wants_history=lambda run: run.status == FINISHED)
    fetched = time.perf_counter()
    runs, excluded = run_table(records, histories, group_by, names)
    result = CompareResult(names, filter_string, group_by, runs, group_table(runs, group_by),
                           *paired_differences(runs), excluded=excluded)
    result.curves = {key: mean_curves(runs, histories[key], group_by) for key in CURVE_KEYS}
    computed = time.perf_counter()
    if plots:
        warming.join()
    result.files = write_outputs(result, Path(out_dir), plots=plots)
    result.timings = {"fetch": fetched - started, "stats": computed - fetched,
                      "write": time.perf_counter() - computed}
    return result


# --- one row per run --------------------------------------------------------------------------
def field_value(run: RunRecord, name: str) -> str | None:
    """A group-by field of a run: `tags.X` / `params.X` explicitly, else mlexp's tag, a tag, a param."""
    if name.startswith("tags."):
        return run.tags.get(name[5:])
    if name.startswith("params."):
        return run.param(name[7:])
    value = run.tags.get(TAG_ALIASES.get(name, f"mlexp.{name}")) or run.tags.get(name) or run.param(name)
    if value and name == "backbone" and "mlexp.backbone" not in run.tags:
        value = value.removesuffix("_pretrained").removesuffix("_scratch")  # runs from before the tags
    return value


def check_group_by(records: list[RunRecord], group_by: list[str]) -> None:
    for name in group_by:
        if name in RESERVED:
            raise MlexpError(f"--group-by {name!r} names a computed column; group by a tag or a param")
        if name != "experiment" and records and not any(field_value(run, name) is not None for run in records):
            params = sorted({key for run in records for key in run.params})
            raise MlexpError(f"--group-by {name!r} is neither a tag nor a param of the selected runs; "
                             f"try backbone, init, strategy, dataset or a param: {', '.join(params[:25])}")


def value_at(points: list[tuple[int, float]], step: int) -> float:
    """The value logged at `step`, or the last one before it (NaN if none)."""
    found = math.nan
    for point_step, value in points:
        if point_step > step:
            break
        found = value
    return found


def run_table(records: list[RunRecord], histories: dict, group_by: list[str],
              experiments: dict[str, str]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Per-run quantities for every finished training run, and the list of runs left out."""
    val_acc = histories.get("val/acc", {})
    usable = [run for run in records if run.status == FINISHED and (run.run_id in val_acc or "val/acc" in run.metrics)]
    check_group_by(usable, group_by)
    usable_ids = {run.run_id for run in usable}
    rows, excluded = [], []
    for run in records:
        experiment = experiments.get(run.experiment_id, run.experiment_id)
        if run.run_id in usable_ids:
            rows.append(run_row(run, val_acc.get(run.run_id, []), group_by, experiment))
        else:
            reason = f"status {run.status}" if run.status != FINISHED else "no val/acc metric (not a training run)"
            excluded.append({"run_id": run.run_id, "run_name": run.run_name, "status": run.status,
                             "experiment": experiment, "reason": reason})
    runs = pd.DataFrame(rows)
    if runs.empty:
        return pd.DataFrame(columns=["run_id", *group_by, *RUN_METRICS]), excluded
    runs["epochs_to_95"] = epochs_to_reach(runs, group_by)
    return runs.drop(columns=["_val_acc_points"]), excluded


def run_row(run: RunRecord, points: list[tuple[int, float]], group_by: list[str], experiment: str) -> dict:
    """One finished run: its group, its pairing keys and its quantities (see compare_report.DEFINITIONS)."""
    m = run.metrics
    epochs = points[-1][0] if points else math.nan
    final_val = m.get("val/acc", points[-1][1] if points else math.nan)
    final_train = m.get("train/acc", math.nan)
    total = m.get("time/total_s", math.nan)
    if math.isnan(total) and run.end_time and run.start_time:
        total = (run.end_time - run.start_time) / 1000
    return {
        "run_id": run.run_id, "run_name": run.run_name, "experiment": experiment,
        **{name: experiment if name == "experiment" else field_value(run, name) or "-" for name in group_by},
        **{f"_{name}": field_value(run, name) or "-" for name in ("backbone", "init", "dataset", "strategy")},
        "seed": run.param("seed") or "-", "fold": run.param("fold") or "-",
        "best_val_acc": m.get("best/val_acc", max((v for _, v in points), default=final_val)),
        "final_val_acc": final_val, "final_train_acc": final_train, "overfit_gap": final_train - final_val,
        "total_time_s": total,
        "epoch_time_s": total / epochs if epochs else math.nan,  # time/total_s is the sum of epoch times
        "trainable_params": m.get("model/params_trainable", m.get("train/trainable_params", math.nan)),
        "epochs_run": epochs,
        "gain_5": (value_at(points, min(EARLY_EPOCHS, epochs)) - value_at(points, points[0][0])
                   if points else math.nan),
        "_val_acc_points": points,
    }


def epochs_to_reach(runs: pd.DataFrame, group_by: list[str]) -> pd.Series:
    """Convergence speed: the first epoch at which a run reaches 95% of its group's best."""
    group_best = runs.groupby(group_by, dropna=False)["best_val_acc"].transform("max")
    result = []
    for points, best in zip(runs["_val_acc_points"], group_best):
        target = CONVERGENCE_FRACTION * best
        result.append(next((float(step) for step, value in points if value >= target), math.nan))
    return pd.Series(result, index=runs.index)


# --- per group ---------------------------------------------------------------------------------------
def group_table(runs: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """runs, and the mean and sample std (ddof=1; NaN for one run) of every per-run quantity."""
    columns = ["runs"] + [f"{m}_{s}" for m in RUN_METRICS for s in ("mean", "std")]
    if runs.empty:
        return pd.DataFrame(columns=[*group_by, *columns])
    grouped = runs.groupby(group_by, dropna=False, sort=True)
    stats = grouped[RUN_METRICS].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    stats.insert(0, "runs", grouped.size())
    return stats.reset_index()


def group_label(row: pd.Series | dict, group_by: list[str]) -> str:
    return "/".join(str(row[name]) for name in group_by)


def mean_curves(runs: pd.DataFrame, points_by_run: dict, group_by: list[str]) -> pd.DataFrame:
    """epoch x group: the mean over the group's runs of a per-epoch metric."""
    if runs.empty:
        return pd.DataFrame()
    labels = {run_id: group_label(row, group_by) for run_id, row in zip(runs["run_id"], runs.to_dict("records"))}
    long = [(labels[run_id], step, value) for run_id, points in points_by_run.items() if run_id in labels
            for step, value in points]
    if not long:
        return pd.DataFrame()
    frame = pd.DataFrame(long, columns=["group", "epoch", "value"])
    return frame.groupby(["epoch", "group"])["value"].mean().unstack("group").sort_index()


# --- pretrained minus scratch, paired -------------------------------------------------------------------
def t_interval(differences: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, two-sided p) of a paired t-test on the differences; NaN with fewer than 2 pairs."""
    from scipy.special import stdtr, stdtrit

    n = len(differences)
    if n < 2:
        return math.nan, math.nan, math.nan
    mean, sd = float(np.mean(differences)), float(np.std(differences, ddof=1))
    if sd == 0.0:
        return mean, mean, (1.0 if mean == 0.0 else 0.0)
    se = sd / math.sqrt(n)
    half = float(stdtrit(n - 1, 0.5 + level / 2)) * se
    return mean - half, mean + half, float(2 * stdtr(n - 1, -abs(mean) / se))


def paired_differences(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pretrained-minus-scratch best val acc per backbone, matched on dataset, strategy, seed and fold.

    Duplicate runs of the same configuration are averaged first, so each pair counts once.
    """
    pair_columns = ["backbone", *PAIR_KEYS, "pretrained_run_id", "scratch_run_id", "pretrained_best_val_acc",
                    "scratch_best_val_acc", "diff_best_val_acc", "pretrained_time_s", "scratch_time_s"]
    if runs.empty:
        return pd.DataFrame(columns=pair_columns), pd.DataFrame()
    frame = runs.rename(columns={"_backbone": "pair_backbone", "_init": "pair_init"})
    frame = frame.assign(**{key: runs[f"_{key}"] for key in ("dataset", "strategy")})
    keys = ["pair_backbone", *PAIR_KEYS]
    sides = {}
    for init in ("pretrained", "scratch"):
        side = frame[frame["pair_init"] == init].groupby(keys, sort=True).agg(
            run_id=("run_id", "first"), best=("best_val_acc", "mean"), time=("total_time_s", "mean"))
        sides[init] = side.add_prefix(f"{init}_")
    pairs = sides["pretrained"].join(sides["scratch"], how="inner").reset_index()
    pairs = pairs.rename(columns={"pair_backbone": "backbone", "pretrained_best": "pretrained_best_val_acc",
                                  "scratch_best": "scratch_best_val_acc", "pretrained_time": "pretrained_time_s",
                                  "scratch_time": "scratch_time_s"})
    pairs["diff_best_val_acc"] = pairs["pretrained_best_val_acc"] - pairs["scratch_best_val_acc"]
    pairs = pairs[pair_columns]
    summary = []
    for backbone, per_backbone in pairs.groupby("backbone", sort=True):
        strategies = sorted(per_backbone["strategy"].unique())
        subsets = [("all", per_backbone)] + ([(s, per_backbone[per_backbone["strategy"] == s]) for s in strategies]
                                             if len(strategies) > 1 else [])
        for strategy, subset in subsets:
            diffs = subset["diff_best_val_acc"].to_numpy(dtype=float)
            low, high, p_value = t_interval(diffs)
            summary.append({
                "backbone": backbone, "strategy": strategy if len(strategies) > 1 else strategies[0],
                "n_pairs": len(diffs), "pretrained_mean": subset["pretrained_best_val_acc"].mean(),
                "scratch_mean": subset["scratch_best_val_acc"].mean(), "mean_diff": float(diffs.mean()),
                "std_diff": float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan,
                "ci95_low": low, "ci95_high": high, "p_value": p_value,
                "time_diff_s": float((subset["pretrained_time_s"] - subset["scratch_time_s"]).mean()),
            })
    return pairs.reset_index(drop=True), pd.DataFrame(summary)


# --- the command -------------------------------------------------------------------------------------
def run_compare(tracking_uri: str | None, experiments: list[str], filter_string: str | None = None,
                group_by: list[str] | None = None, out_dir: Path | str = "mlexp-compare", *,
                compare_experiment: str = "mlexp-compare", log_run: bool = True) -> CompareResult:
    """`mlexp compare`: compare, then log the outputs to an MLflow run.

    Under `mlflow run` that is the project's run (MLFLOW_RUN_ID, in the experiment `mlflow run`
    chose); otherwise a new run in `compare_experiment`, kept apart from the training runs.
    """
    from mlexp.tracking import check_reachable, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    check_reachable(uri)
    client = mlflow_client(uri)
    result = compare(client, experiments, filter_string, group_by, out_dir)
    if log_run:
        result.run_id = log_compare_run(uri, result, Path(out_dir), compare_experiment)
    return result


def log_compare_run(tracking_uri: str, result: CompareResult, out_dir: Path, compare_experiment: str) -> str:
    """Log summary params, metrics and out_dir (as artifacts under compare/) to the compare run
    (under `mlflow run`: the entry point's run), through the tracking outbox."""
    import mlexp
    from mlexp import tracking

    name = ("compare-" + "+".join(result.experiments.values()))[:250]
    tracker = tracking.open_run(tracking_uri, compare_experiment, name, heartbeat=False,
                                tags={"mlexp.kind": "compare", "mlexp.version": mlexp.__version__})
    try:
        statuses = [row["status"] for row in result.excluded]
        metrics = {"runs": len(result.runs), "groups": len(result.groups), "excluded": len(result.excluded),
                   "running": statuses.count("RUNNING"), "failed": statuses.count("FAILED")}
        if not result.pair_summary.empty:  # each backbone's first row is over all its strategies
            for row in result.pair_summary.drop_duplicates("backbone").to_dict("records"):
                metrics[f"pretrain_gain/{row['backbone']}"] = row["mean_diff"]
                metrics[f"pretrain_pairs/{row['backbone']}"] = row["n_pairs"]
        # Prefixed: under `mlflow run` the entry point's own parameters are already on the run.
        tracker.log_params({"compare.experiments": ",".join(result.experiments.values())[:6000],
                            "compare.filter": result.filter_string or "", "compare.group_by": ",".join(result.group_by)})
        tracker.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))},
                            step=0)
        tracker.log_artifacts(out_dir, "compare", copy=True)  # the user keeps out_dir
    except BaseException as error:
        tracker.finish("FAILED", error=f"{type(error).__name__}: {error}")
        raise
    if os.environ.get("MLFLOW_RUN_ID"):  # the project's run: `mlflow run` ends it
        delivery = tracker.abandon(wait_s=tracking.run.grace_s())
    else:
        delivery = tracker.finish("FINISHED")
    if not delivery.complete:
        print(f"mlexp: compare run {delivery.run_id}: {delivery.describe()}", file=sys.stderr)
    return tracker.run_id


def format_table(result: CompareResult) -> str:
    """The groups, the paired pretrained-vs-scratch differences and the excluded runs, as text."""
    from mlexp.compare_report import render_summary

    return render_summary(result, markdown=False)
