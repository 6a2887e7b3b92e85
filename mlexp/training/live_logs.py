"""Logs you can `tail` while a run trains: `LOG_DIR/RUN_ID/` (default mlexp-output/runs/).

`epoch_metrics.csv` and `batch_metrics.csv` have the columns of the run's metrics/*.csv
artifacts (written at the end); here they grow as the numbers are made: an epoch's row as
soon as it is evaluated, batch rows at most once a second (a write per step would cost the
training loop a system call each). `log.jsonl` holds one JSON event per line: start,
each epoch, resume, end.

A killed run keeps what it wrote. A resume continues from a checkpoint, whose history holds
every epoch and step up to it: the CSVs are rewritten from that history, so the epochs and
steps trained again after the kill appear once, not twice.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from mlexp.training.records import History

BATCH_FLUSH_S = 1.0
FILES = ("epoch_metrics.csv", "batch_metrics.csv", "log.jsonl")


class LiveLogs:
    """The run's local logs, appended as it trains (main process only)."""

    def __init__(self, folder: Path, history: History, resumed_after: int | None):
        self.folder, self.epoch_columns = folder, history.epoch_columns()
        folder.mkdir(parents=True, exist_ok=True)
        self._rewrite(history)
        self.pending: list[list] = []
        self.last_flush = time.monotonic()
        events = self._events_before(resumed_after) if resumed_after is not None else []
        with open(folder / "log.jsonl", "w") as out:
            out.writelines(json.dumps(event) + "\n" for event in events)

    def _rewrite(self, history: History) -> None:
        with open(self.folder / "epoch_metrics.csv", "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=self.epoch_columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history.epochs)
        with open(self.folder / "batch_metrics.csv", "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(history.batch_columns())
            writer.writerows(history.steps)

    def _events_before(self, epoch: int) -> list[dict]:
        """The events of the run's earlier process up to its checkpoint's epoch (a kill's later ones go)."""
        try:
            lines = (self.folder / "log.jsonl").read_text().splitlines()
        except OSError:
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:  # the line a SIGKILL cut short
                continue
            if event.get("event") != "epoch" or event.get("epoch", 0) <= epoch:
                events.append(event)
        return events

    def event(self, kind: str, **values) -> None:
        with open(self.folder / "log.jsonl", "a") as out:
            out.write(json.dumps({"event": kind, "time": time.time(), **values}, default=str) + "\n")

    def steps(self, rows: list[list]) -> None:
        self.pending.extend(rows)
        if time.monotonic() - self.last_flush >= BATCH_FLUSH_S:
            self.flush_steps()

    def flush_steps(self) -> None:
        if self.pending:
            with open(self.folder / "batch_metrics.csv", "a", newline="") as out:
                csv.writer(out).writerows(self.pending)
            self.pending.clear()
        self.last_flush = time.monotonic()

    def epoch(self, row: dict) -> None:
        """An epoch's row, the moment it is evaluated (with the steps that led to it)."""
        self.flush_steps()
        with open(self.folder / "epoch_metrics.csv", "a", newline="") as out:
            csv.DictWriter(out, fieldnames=self.epoch_columns, extrasaction="ignore").writerow(row)
        self.event("epoch", **row)


class NoLogs:
    """A process that keeps no live logs (another DDP rank, an untracked run)."""

    def event(self, kind: str, **values) -> None:
        pass

    def steps(self, rows: list[list]) -> None:
        pass

    def flush_steps(self) -> None:
        pass

    def epoch(self, row: dict) -> None:
        pass


def open_live_logs(log_dir: str, run_id: str | None, history: History, resumed_after: int | None,
                   main_process: bool) -> LiveLogs | NoLogs:
    if not run_id or not main_process:
        return NoLogs()
    return LiveLogs(Path(log_dir).expanduser() / run_id, history, resumed_after)
