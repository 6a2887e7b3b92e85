"""The run's history in memory, and the files written from it (the per-epoch and per-batch CSVs and the summary).

One record per epoch whose field names are the metric names: the MLflow metrics, the
columns of `epoch_metrics.csv` and the lists in `training_info.json` are all read from it,
so `train/loss` is called `train/loss` everywhere.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mlexp.training.loop import EpochStats, EvalResult, StepRecord

# Logged to MLflow at step = epoch, and the CSV's columns under the same names.
EPOCH_METRICS = ("train/loss", "train/loss_total", "train/acc", "val/loss", "val/acc", "val/macro_f1", "epoch/time_s",
                 "epoch/lr", "train/phase", "train/trainable_params")
EPOCH_COLUMNS = ["epoch", *EPOCH_METRICS, "samples", "is_best", "checkpoint_path", "timestamp"]
# Logged to MLflow at step = global optimizer step.
STEP_METRICS = ("batch/loss", "batch/lr", "batch/samples_per_s")
BATCH_COLUMNS = ["epoch", "batch", "step", *STEP_METRICS, "timestamp"]
# Another task's epochs (a detector's, a user's own): its loss components' means (train/<name>) and its
# validation metrics (val/<name>: a detector's COCO mAPs), as its task names them.


def epoch_record(epoch: int, stats: EpochStats, val: EvalResult, lr: float, phase: int, trainable: int) -> dict:
    """The one record of an epoch (its metrics under their MLflow names, and bookkeeping)."""
    return {"epoch": epoch, "train/loss": stats.loss, "train/loss_total": stats.loss_total, "train/acc": stats.acc,
            "val/loss": val.loss, "val/acc": val.acc, "val/macro_f1": macro_f1(val.logits, val.labels),
            "epoch/time_s": stats.time_s, "epoch/lr": lr,
            "train/phase": phase, "train/trainable_params": trainable, "samples": stats.samples,
            "checkpoint_path": "checkpoints/last"}


def macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 averaged over the classes that occur in the labels or the predictions (scikit-learn's
    f1_score(average="macro", zero_division=0)), in torch: it runs every epoch."""
    predicted = logits.argmax(dim=1)
    scores = []
    for label in torch.unique(torch.cat([labels, predicted])):
        hit, truth = predicted == label, labels == label
        true_positive = (hit & truth).sum().item()
        scores.append(2 * true_positive / (hit.sum().item() + truth.sum().item()))
    return sum(scores) / len(scores) if scores else 0.0


def task_epoch_record(epoch: int, stats: EpochStats, val: dict[str, float], lr: float, phase: int,
                      trainable: int) -> dict:
    """Another task's epoch: the loss, each component's mean, and its validation metrics."""
    return {"epoch": epoch, "train/loss": stats.loss, "train/loss_total": stats.loss_total,
            **{f"train/{name}": value for name, value in stats.components.items()},
            **{f"val/{name}": float(value) for name, value in val.items()},  # a task's tensors and NumPy values too
            "epoch/time_s": stats.time_s, "epoch/lr": lr,
            "train/phase": phase, "train/trainable_params": trainable, "samples": stats.samples,
            "checkpoint_path": "checkpoints/last"}


def epoch_metric_names(components: list[str], val_metrics: list[str]) -> tuple[str, ...]:
    """The metrics an epoch logs: classification's (no `val_metrics`), or another task's."""
    if not val_metrics:
        return EPOCH_METRICS
    return ("train/loss", "train/loss_total", *(f"train/{name}" for name in components), *val_metrics,
            "epoch/time_s", "epoch/lr", "train/phase", "train/trainable_params")


def epoch_metrics(record: dict) -> dict[str, float]:
    """The epoch's metrics: classification's (an epoch recorded by an older mlexp lacks the newer
    ones), or every metric another task's record holds (its names have a /)."""
    if "val/acc" in record:
        return {name: record[name] for name in EPOCH_METRICS if name in record}
    return {name: value for name, value in record.items() if "/" in name and isinstance(value, (int, float))}


def step_metrics(record: StepRecord) -> dict[str, float]:
    return {"batch/loss": record.loss, "batch/lr": record.lr, "batch/samples_per_s": record.samples_per_s,
            **{f"batch/{name}": value for name, value in record.components.items()}}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


@dataclass
class History:
    """Per-epoch and per-step records; plain values so they travel inside the resume checkpoint."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[list[Any]] = field(default_factory=list)  # rows in BATCH_COLUMNS order
    best_val_acc: float = -1.0  # val/acc at the best epoch
    best_epoch: int = 0
    best_value: float | None = None  # the best metric's value (--best-metric) at the best epoch
    components: list[str] = field(default_factory=list)  # the loss's named parts (a detector's), in every row
    val_metrics: list[str] = field(default_factory=list)  # another task's val/<name> metrics (none: classification)

    def add_steps(self, records: list[StepRecord]) -> None:
        self.steps.extend([r.epoch, r.batch, r.step, r.loss, r.lr, r.samples_per_s, iso(r.timestamp),
                           *(r.components[name] for name in self.components)] for r in records)

    def epoch_columns(self) -> list[str]:
        return ["epoch", *epoch_metric_names(self.components, self.val_metrics),
                *EPOCH_COLUMNS[len(EPOCH_METRICS) + 1:]]

    def batch_columns(self) -> list[str]:
        return [*BATCH_COLUMNS, *(f"batch/{name}" for name in self.components)]

    def add_epoch(self, row: dict[str, Any], metric: str = "val/acc", maximize: bool = True) -> bool:
        """Record an epoch; returns whether it is the best so far by `metric` (a NaN never is)."""
        value = row[metric]
        is_best = value == value and (self.best_value is None or
                                      (value > self.best_value if maximize else value < self.best_value))
        if is_best:
            self.best_value, self.best_val_acc, self.best_epoch = value, row.get("val/acc", float("nan")), row["epoch"]
        self.epochs.append({**row, "is_best": is_best, "timestamp": datetime.now(timezone.utc).isoformat()})
        return is_best

    def column(self, name: str) -> list:
        """One field of every epoch, in order (None where an older mlexp did not record it)."""
        return [row.get(name) for row in self.epochs]

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint keeps (val_metrics is the task's, set again at every start: a checkpoint
        without it stays readable by the mlexp before it)."""
        state = asdict(self)
        del state["val_metrics"]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "History":
        """A checkpoint's history; one written before --best-metric chose by val/acc."""
        if "best_value" not in state and state.get("best_epoch"):
            state = {**state, "best_value": state["best_val_acc"]}
        return cls(**state)


def write_csvs(history: History, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "epoch_metrics.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=history.epoch_columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history.epochs)
    with open(directory / "batch_metrics.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(history.batch_columns())
        writer.writerows(history.steps)


def write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return path


def training_info(spec, cfg, built, history: History, calibration: dict, params: dict) -> dict[str, Any]:
    """summary/training_info.json: what was trained, from which weights, and how it went
    (every epoch metric as a list under its metric name)."""
    return {"backbone": spec.name, "arch": spec.arch, "timm_model": spec.timm_name, "init": spec.init,
            "status": "FINISHED", "config": cfg.to_dict(), "params": params,
            "weights": {"source": built.weights_source, "path": built.weights_path, "sha256": built.weights_sha256},
            "best_epoch": history.best_epoch, "best_val_acc": history.best_val_acc,
            "epochs": {name: history.column(name)
                       for name in epoch_metric_names(history.components, history.val_metrics)},
            "total_time_s": sum(history.column("epoch/time_s")), "calibration": calibration,
            "artifacts": {"config": "config.json", "last": "checkpoints/last/",
                          "best": "checkpoints/best/model.safetensors", "final": "checkpoints/final/model.safetensors",
                          "epoch_metrics": "metrics/epoch_metrics.csv", "batch_metrics": "metrics/batch_metrics.csv"}}
