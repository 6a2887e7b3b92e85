"""Answer the research questions from the tracking server alone.

Does pretraining help this backbone, by how much (paired across seeds and folds, with a
95% confidence interval), which fine-tuning strategy wins, and at what cost in time and
trainable parameters? `compare()` queries MLflow, builds one row per finished training
run, aggregates per group and writes tables and plots; `run_compare()` is what the CLI and
the MLproject entry point call: it also logs the outputs to an MLflow run.

Accuracies are fractions (0..1) in the data and files, percentages in the printed tables.
Training runs that are not FINISHED (RUNNING, FAILED, KILLED), or finished without a val/acc,
are listed as not in the statistics; runs that are not training runs at all (sweep parents,
earlier compare runs, runs without training tags, params or metrics) are only counted.

Backbones are named as the sweep summary names them: the catalogue name (`resnet18_scratch`,
`vit_small`), so pretrained and scratch runs are separate groups; `arch` is the architecture
alone (`resnet18`), which is also what pretrained/scratch pairs are matched on.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mlexp.analysis.arms import check_keys, parse_pairs
from mlexp.analysis.comparisons import choose_metric, comparisons
from mlexp.analysis.groups import RUN_METRICS, banded_curves, difference_curves, group_table, metric_values
from mlexp.analysis.mlflow_internals import Reader
from mlexp.analysis.plots import warm_up
from mlexp.analysis.query import (
    FINISHED,
    Histories,
    RunRecord,
    fetch_runs,
    mlflow_client,
    read_histories,
    resolve_experiments,
)
from mlexp.analysis.report import log_compare_run, write_outputs
from mlexp.analysis.result import CompareResult
from mlexp.analysis.scores import ACCURACY, SCORES, Score, score_of
from mlexp.analysis.tables import render_summary
from mlexp.config import BOOKKEEPING, DEFAULT_EXPERIMENT
from mlexp.errors import MlexpError
from mlexp.models.catalogue import CATALOGUE
from mlexp.option_values import best_is_max
from mlexp.sweep.plan import display_name
from mlexp.tracking import check_reachable, default_tracking_uri

DEFAULT_GROUP_BY = ["backbone", "strategy"]
INITS = ("pretrained", "scratch")
# Short names that mean mlexp's own tags (`arch` is the backbone without its init).
TAG_ALIASES = {"arch": "mlexp.backbone", "init": "mlexp.init", "strategy": "mlexp.strategy",
               "dataset": "mlexp.dataset"}
# What marks a training run (besides a `backbone` param): mlexp's tags, or a training metric.
TRAINING_TAGS = ("mlexp.backbone", "mlexp.init", "mlexp.strategy", "mlexp.sweep_id", "mlexp.config_hash")
TRAINING_METRIC_PREFIXES = ("train/", "val/", "epoch/", "best/")
CURVE_KEYS = (*(score.curve for score in SCORES.values()), "val/loss")  # fetched for the runs that logged them
PAIR_FIELDS = ("arch", "init", "dataset", "strategy")  # kept per run (as _arch, ...) to match pairs on
CONVERGENCE_FRACTION = 0.95
EARLY_EPOCHS = 5
# Params that do not change what a run learned from which images: runs equal in everything else and
# in their split digest are one sample, whatever their fold says.
NOT_THE_SAMPLE = {"fold", *BOOKKEEPING}
RESERVED = {"run_id", "run_name", *RUN_METRICS}


def compare(client_or_uri: Any, experiments: list[str], filter_string: str | None = None,
            group_by: list[str] | None = None, out_dir: Path | str = "mlexp-compare",
            plots: bool = True, *, metric: str | None = None, equal_budget: bool = False,
            between_backbones: bool = False, features: bool = False, arm_pairs: list[str] | tuple = ()
            ) -> CompareResult:
    """Query the runs of `experiments`, compute the statistics, write tables and plots to out_dir.

    metric: what the comparisons compare (default: test/acc when the runs have it, else the
    runs' own best metric, best/val_acc by default); equal_budget: compare each pair at the epoch
    the shorter run stopped; between_backbones: also compare architectures with each other;
    features: load the paired pretrained and scratch models and compare their representations
    (CKA, mlexp.analysis.features); arm_pairs: --pair values, 'A vs B' (mlexp.analysis.arms)."""

    started = time.perf_counter()
    client = mlflow_client(client_or_uri)
    group_by = list(group_by or DEFAULT_GROUP_BY)
    if not experiments:
        raise MlexpError("name at least one experiment to compare (--experiment NAME)")
    specs = parse_pairs(arm_pairs)  # a malformed --pair fails before the server is asked anything
    names = resolve_experiments(client, experiments)
    warming = threading.Thread(target=warm_up, name="mlexp-plot-warm-up", daemon=True)
    if plots:
        warming.start()  # matplotlib's import and font loading overlap the server's work
    reader = Reader(client)
    records, histories = fetch_runs(client, list(names), filter_string, CURVE_KEYS,
                                    wants_history=lambda run: run.status == FINISHED, reader=reader)
    fetched = time.perf_counter()
    runs, excluded, ignored, score = scored_table(records, histories, group_by, names, reader)
    compared = set(runs["run_id"])  # once: a set built per record would cost O(runs^2) over thousands
    used = [run for run in records if run.run_id in compared]
    available = {key for run in used for key in run.metrics}
    everywhere = set.intersection(*(set(run.metrics) for run in used)) if used else set()
    chosen = choose_metric(metric, available, everywhere, equal_budget, {own_best(run) for run in used}, score)
    runs["value"] = metric_values(runs, records, chosen, score)
    missing = runs.loc[runs["value"].isna(), "run_id"].tolist()
    check_keys(specs, used, field_value)
    by_id = {run.run_id: run for run in used}
    for index, spec in enumerate(specs):
        runs[f"_pair{index}"] = pd.Series([spec.side(by_id[i], field_value) for i in runs["run_id"]], dtype=object,
                                          index=runs.index)
    table, pairs = comparisons(runs, chosen, equal_budget=equal_budget, between_backbones=between_backbones,
                               arm_pairs=specs)
    result = CompareResult(names, filter_string, group_by, runs, group_table(runs, group_by), pairs, table,
                           chosen, excluded=excluded, ignored=ignored, equal_budget=equal_budget,
                           lacking_metric=missing, arm_pairs=specs, score=score)
    result.reads = {"taken": dict(reader.taken), "fallbacks": list(reader.fallbacks)}
    result.curves = {key: banded_curves(runs, histories[key], group_by) for key in (score.curve, "val/loss")}
    result.diff_curves = difference_curves(runs, histories[score.curve])
    if features:
        from mlexp.analysis.features import compare_features  # here: it loads torch, only --features needs it

        result.features = compare_features(client, runs, Path(out_dir))
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
    if name == "backbone":
        return backbone_name(run)
    if name == "arch":
        return arch_of(run)
    return run.tags.get(TAG_ALIASES.get(name, f"mlexp.{name}")) or run.tags.get(name) or run.param(name)


def own_best(run: RunRecord) -> tuple[str, bool]:
    """The metric a run chose its best epoch by (--best-metric; val/acc before there was one)
    and whether higher is better there (--best-mode)."""
    metric = run.param("best_metric") or "val/acc"  # a detector's is always logged
    return metric, best_is_max(metric, run.param("best_mode") or "auto")


def arch_of(run: RunRecord) -> str | None:
    """The architecture without init (tag mlexp.backbone): what pretrained/scratch pairs share."""
    if "mlexp.backbone" in run.tags:
        return run.tags["mlexp.backbone"]
    name = run.param("backbone")  # runs from before the tags
    return name.removesuffix("_pretrained").removesuffix("_scratch") if name else None


def backbone_name(run: RunRecord) -> str | None:
    """The backbone as the sweep summary names it: the logged (effective) catalogue name, e.g.
    resnet18_scratch or vit_small; a plain timm name gets its init appended (convnext_tiny_scratch)."""

    name, arch = run.param("backbone"), arch_of(run)
    init = run.tags.get("mlexp.init") or run.param("init")
    if name in CATALOGUE or not arch or init not in INITS:
        return name or arch
    return display_name(name if name and name.endswith(f"_{init}") else arch, init)


def non_training_kind(run: RunRecord, parent_ids: set[str]) -> str | None:
    """What a run is if it is not a training run (None for a training run)."""
    if run.tags.get("mlexp.sweep") == "true":
        return "sweep parent"
    if run.tags.get("mlexp.kind") not in (None, "train"):
        return f"{run.tags['mlexp.kind']} run"
    if run.run_id in parent_ids:
        return "parent run"
    if (any(tag in run.tags for tag in TRAINING_TAGS) or run.param("backbone")
            or any(key.startswith(TRAINING_METRIC_PREFIXES) for key in run.metrics)):
        return None
    return "no training tags, params or metrics"


def check_group_by(records: list[RunRecord], group_by: list[str]) -> None:
    for name in group_by:
        if name in RESERVED:
            raise MlexpError(f"--group-by {name!r} names a computed column; group by a tag or a param")
        if name != "experiment" and records and not any(field_value(run, name) is not None for run in records):
            params = sorted({key for run in records for key in run.params})
            raise MlexpError(f"--group-by {name!r} is neither a tag nor a param of the selected runs; try "
                             f"backbone, arch, init, strategy, dataset or a param: {', '.join(params[:25])}")


def value_at(points: list[tuple[int, float]], step: int) -> float:
    """The value logged at `step`, or the last one before it (NaN if none)."""
    found = math.nan
    for point_step, value in points:
        if point_step > step:
            break
        found = value
    return found


def duplicates(runs: list[RunRecord]) -> dict[str, str]:
    """run id -> why it is not counted: finished runs of one configuration (one
    mlexp.config_hash) count once, the first trained, never as independent seeds; and runs that
    differ only in their fold but trained on the same split (one mlexp.split_digest: folds that
    were not folds) count once, never as independent folds."""
    first: dict[tuple, RunRecord] = {}
    repeats: dict[str, str] = {}
    for run in sorted(runs, key=lambda r: (r.start_time or 0, r.run_id)):
        config, split = run.tags.get("mlexp.config_hash"), run.tags.get("mlexp.split_digest")
        sample = (split, *sorted((name.removeprefix("effective."), value) for name, value in run.params.items()
                                 if name.removeprefix("effective.") not in NOT_THE_SAMPLE))
        for key, why in (("config", config), ("split", split and sample)):
            if why is None:
                continue
            if (key, why) not in first:
                first[(key, why)] = run
            elif run.run_id not in repeats:
                other = first[(key, why)]
                repeats[run.run_id] = (
                    f"the same configuration as run {other.run_id} (mlexp.config_hash {config}): counted once"
                    if key == "config" else
                    f"fold {run.param('fold')} trained and validated on the same images as fold {other.param('fold')} "
                    f"(run {other.run_id}, mlexp.split_digest {split}): counted once, not as another fold")
    return repeats


def scored_table(records: list[RunRecord], histories: Histories, group_by: list[str], names: dict[str, str],
                 reader: Reader) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, int], Score]:
    """run_table; for a task of the user's own, whose curve compare could not know to fetch
    with the others, that curve fetched once its name is known and the table made with it."""
    table = run_table(records, histories, group_by, names)
    score = table[-1]
    if score.curve in histories:
        return table
    histories[score.curve] = read_histories(reader, [run.run_id for run in records if run.status == FINISHED],
                                            score.curve)
    return run_table(records, histories, group_by, names)


def run_table(records: list[RunRecord], histories: dict, group_by: list[str], experiments: dict[str, str]
              ) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, int], Score]:
    """Per-run quantities for every finished training run, the training runs left out (and why),
    how many runs of each kind were not training runs, and the score they are measured by (their
    task's: accuracy, or a detector's mAP). Columns keep accuracy's names inside compare; what is
    written is named after the score (mlexp.analysis.report)."""
    parent_ids = {run.tags["mlflow.parentRunId"] for run in records if "mlflow.parentRunId" in run.tags}
    rows, excluded, ignored, training = [], [], {}, []
    for run in records:
        kind = non_training_kind(run, parent_ids)
        if kind is not None:
            ignored[kind] = ignored.get(kind, 0) + 1
        else:
            training.append(run)
    finished = [run for run in training if run.status == FINISHED]
    score = score_of({run.param("task") or "classification" for run in finished},
                     {run.param("task"): run.param("best_metric") for run in finished if run.param("task")})
    curves = histories.get(score.curve, {})
    usable = [run for run in training
              if run.status == FINISHED and (run.run_id in curves or score.curve in run.metrics)]
    duplicate_of = duplicates(usable)
    usable = [run for run in usable if run.run_id not in duplicate_of]
    check_group_by(usable, group_by)
    usable_ids = {run.run_id for run in usable}
    for run in training:
        experiment = experiments.get(run.experiment_id, run.experiment_id)
        if run.run_id in usable_ids:
            rows.append(run_row(run, curves.get(run.run_id, []), group_by, experiment, score))
        elif run.run_id in duplicate_of:
            excluded.append({"run_id": run.run_id, "run_name": run.run_name, "status": "DUPLICATE",
                             "experiment": experiment, "reason": duplicate_of[run.run_id]})
        else:
            task = run.param("task") or "classification"
            reason = (f"status {run.status}" if run.status != FINISHED else
                      f"a {task} run: compare its task's runs on their own (--filter \"params.task = '{task}'\")"
                      if task != score.task else f"finished without a {score.curve} metric")
            excluded.append({"run_id": run.run_id, "run_name": run.run_name, "status": run.status,
                             "experiment": experiment, "reason": reason})
    runs = pd.DataFrame(rows)
    if runs.empty:
        columns = ["run_id", *group_by, *(f"_{name}" for name in PAIR_FIELDS), "seed", "fold", *RUN_METRICS]
        return pd.DataFrame(columns=[*columns, "_val_acc_points"]), excluded, ignored, score
    runs["epochs_to_95"] = epochs_to_reach(runs, group_by)
    return runs, excluded, ignored, score


def run_row(run: RunRecord, points: list[tuple[int, float]], group_by: list[str], experiment: str,
            score: Score = ACCURACY) -> dict:
    """One finished run: its group, its pairing keys and its quantities (see compare_report.DEFINITIONS)."""
    m = run.metrics
    epochs = points[-1][0] if points else math.nan
    final_val = m.get(score.curve, points[-1][1] if points else math.nan)
    final_train = m.get(score.train, math.nan) if score.train else math.nan
    total = m.get("time/total_s", math.nan)
    if math.isnan(total) and run.end_time and run.start_time:
        total = (run.end_time - run.start_time) / 1000
    return {
        "run_id": run.run_id, "run_name": run.run_name, "experiment": experiment,
        **{name: experiment if name == "experiment" else field_value(run, name) or "-" for name in group_by},
        **{f"_{name}": field_value(run, name) or "-" for name in PAIR_FIELDS},
        "seed": run.param("seed") or "-", "fold": run.param("fold") or "-",
        "best_val_acc": m.get(score.best, max((v for _, v in points), default=final_val)),
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


# --- the command -------------------------------------------------------------------------------------
def run_compare(tracking_uri: str | None, experiments: list[str], filter_string: str | None = None,
                group_by: list[str] | None = None, out_dir: Path | str = "mlexp-compare", *,
                compare_experiment: str | None = None, log_run: bool = True, run_id: str | None = None,
                **options: Any) -> CompareResult:
    """`mlexp compare`: compare, then log the outputs to an MLflow run.

    `options`: compare()'s metric, equal_budget, between_backbones and features.
    `run_id`: an existing run to log into (under `mlflow run`, the project's run, left for
    `mlflow run` to end); otherwise a new run named after what it compares ("compare digits
    by backbone,strategy") in `compare_experiment`, by default "<experiment>-compare": next
    to the compared experiment in the MLflow UI, apart from its training runs.
    """

    uri = tracking_uri or default_tracking_uri()
    check_reachable(uri)
    client = mlflow_client(uri)
    result = compare(client, experiments, filter_string, group_by, out_dir, **options)
    if log_run:
        default_experiment, run_name = compare_run_place(result)
        result.run_id = log_compare_run(uri, result, Path(out_dir), compare_experiment or default_experiment, run_name,
                                        run_id)
    return result


def compare_run_place(result: CompareResult) -> tuple[str, str]:
    """The compare run's default experiment, next to the compared one, and its name:
    ("digits-compare", "compare digits by backbone,strategy"), with the filter if there is one."""
    compared = "+".join(result.experiments.values()) or DEFAULT_EXPERIMENT
    name = f"compare {compared} by {','.join(result.group_by)}"
    return compared[:200] + "-compare", (name + (f" where {result.filter_string}" if result.filter_string else ""))[:250]


def format_table(result: CompareResult) -> str:
    """The groups, the paired pretrained-vs-scratch differences and the excluded runs, as text."""

    return result.score.worded(render_summary(result, markdown=False))
