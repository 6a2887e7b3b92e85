"""What `compare` writes: its tables (CSV, Markdown, JSON), report.md, the plots, and the
MLflow run they are logged to."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import mlexp
from mlexp import tracking
from mlexp.analysis.answers import report_markdown
from mlexp.analysis.plots import plot_all
from mlexp.analysis.scores import Score
from mlexp.analysis.tables import DEFINITIONS, render_summary

if TYPE_CHECKING:
    from mlexp.analysis.result import CompareResult


def write_outputs(result: CompareResult, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("groups.csv", "pairs.csv", "comparisons.csv", "runs.csv", "groups.md", "compare.json", "report.md")
    files = [out_dir / name for name in names]
    score = result.score  # the files name the runs' score: a detector's columns say val_map, not val_acc
    written(result.groups, score).to_csv(files[0], index=False)
    result.pairs.drop(columns=["points_a", "points_b"], errors="ignore").to_csv(files[1], index=False)
    result.comparisons.to_csv(files[2], index=False)
    written(result.runs.drop(columns=[c for c in result.runs.columns if c.startswith("_")]), score).to_csv(
        files[3], index=False)
    files[4].write_text(score.worded(render_summary(result, markdown=True)))
    files[5].write_text(json.dumps(summary_json(result), indent=2, allow_nan=False))
    files[6].write_text(score.worded(report_markdown(result)))
    if plots and not result.groups.empty:
        files += plot_all(result, out_dir)
    files += [path for feature in result.features for path in feature.files]
    return files


def written(frame: pd.DataFrame, score: Score) -> pd.DataFrame:
    """A table as the files show it: columns named after the score; a task with no training
    curve of its score (a detector's) has no train columns to show."""
    if score.train is None:
        frame = frame.drop(columns=[c for c in frame.columns if c.startswith(("final_train_acc", "overfit_gap"))])
    return frame.rename(columns=score.columns(frame.columns))


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts (NaN -> null, numpy -> Python)."""
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []


def summary_json(result: CompareResult) -> dict[str, Any]:
    score = result.score
    return {"experiments": result.experiments, "filter": result.filter_string, "group_by": result.group_by,
            "n_runs": len(result.runs), "groups": records(written(result.groups, score)),
            "metric": result.metric.key, "equal_budget": result.equal_budget,
            "comparisons": records(result.comparisons),
            "pairs": records(result.pairs.drop(columns=["points_a", "points_b"], errors="ignore")),
            "features": [feature.summary() for feature in result.features],
            "excluded": result.excluded, "not_training_runs": result.ignored, "mlflow_reads": result.reads,
            "definitions": {score.worded(name): score.worded(said) for name, said in DEFINITIONS.items()}}


# --- the MLflow run -------------------------------------------------------------------------------------
def log_compare_run(tracking_uri: str, result: CompareResult, out_dir: Path, experiment: str, run_name: str,
                    project_run_id: str | None = None) -> str:
    """Log summary params, metrics and out_dir (as artifacts under compare/) to a new run in
    `experiment`, or to `project_run_id` (the run `mlflow run` made, which it ends), through
    the tracking outbox."""

    tracker = tracking.open_run(tracking_uri, experiment, run_name, run_id=project_run_id, heartbeat=False,
                                tags={"mlexp.kind": "compare", "mlexp.version": mlexp.__version__})
    try:
        statuses = [row["status"] for row in result.excluded]
        metrics = {"runs": len(result.runs), "groups": len(result.groups), "excluded": len(result.excluded),
                   "running": statuses.count("RUNNING"), "failed": statuses.count("FAILED"),
                   "not_training": sum(result.ignored.values())}
        gains = result.comparisons[result.comparisons["kind"] == "init"]
        for row in gains.drop_duplicates("backbone").to_dict("records"):  # each backbone's first row: all strategies
            name = row["backbone"].replace(" ", "_")
            metrics[f"pretrain_gain/{name}"] = row["mean_diff"]
            metrics[f"pretrain_pairs/{name}"] = row["n"]
            metrics[f"pretrain_p_holm/{name}"] = row["p_holm"]
        asked = result.comparisons[result.comparisons["kind"] == "pair"].drop_duplicates(["a", "b"])
        for number, row in enumerate(asked.to_dict("records"), start=1):  # each --pair's first row: all backbones
            metrics.update({f"pair_diff/{number}": row["mean_diff"], f"pair_n/{number}": row["n"],
                            f"pair_p_holm/{number}": row["p_holm"]})
        # Prefixed: under `mlflow run` the entry point's own parameters are already on the run.
        tracker.log_params({"compare.experiments": ",".join(result.experiments.values())[:6000],
                            "compare.filter": result.filter_string or "", "compare.group_by": ",".join(result.group_by),
                            "compare.metric": result.metric.key, "compare.equal_budget": str(result.equal_budget),
                            "compare.pair": "; ".join(pair.label for pair in result.arm_pairs)[:6000]})
        tracker.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))},
                            step=0)
        tracker.log_artifacts(out_dir, "compare", copy=True)  # the user keeps out_dir
    except BaseException as error:
        tracker.finish("FAILED", error=f"{type(error).__name__}: {error}")
        raise
    if project_run_id:  # `mlflow run` ends its own run
        delivery = tracker.abandon(wait_s=tracking.run.grace_s())
    else:
        delivery = tracker.finish("FINISHED")
    if not delivery.complete:
        print(f"mlexp: compare run {delivery.run_id}: {delivery.describe()}", file=sys.stderr)
    return tracker.run_id
