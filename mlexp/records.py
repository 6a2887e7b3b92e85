"""The run's history in memory, and the files written from it (the per-epoch and per-batch CSVs and the summary)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlexp.loop import StepRecord

EPOCH_COLUMNS = ["epoch", "avg_loss", "total_loss", "train_acc", "val_loss", "val_acc", "epoch_time_sec",
                 "learning_rate", "phase", "trainable_params", "is_best", "checkpoint_path", "timestamp"]
BATCH_COLUMNS = ["epoch", "batch", "step", "loss", "learning_rate", "samples_per_s", "timestamp"]


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


@dataclass
class History:
    """Per-epoch and per-step records; plain values so they travel inside the resume checkpoint."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[list[Any]] = field(default_factory=list)  # rows in BATCH_COLUMNS order
    best_val_acc: float = -1.0
    best_epoch: int = 0

    def add_steps(self, records: list[StepRecord]) -> None:
        self.steps.extend([r.epoch, r.batch, r.step, r.loss, r.lr, r.samples_per_s, iso(r.timestamp)]
                          for r in records)

    def add_epoch(self, row: dict[str, Any]) -> bool:
        """Record an epoch; returns whether it is the best so far (by validation accuracy)."""
        is_best = row["val_acc"] > self.best_val_acc
        if is_best:
            self.best_val_acc, self.best_epoch = row["val_acc"], row["epoch"]
        self.epochs.append({**row, "is_best": is_best})
        return is_best

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "History":
        return cls(**state)


def write_csvs(history: History, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "epoch_metrics.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history.epochs)
    with open(directory / "batch_metrics.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(BATCH_COLUMNS)
        writer.writerows(history.steps)


def write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return path
