"""Seed 000's training monitor, answered from the tracking server.

`progress`: the runs still training, how far along (epoch of total), their latest
validation accuracy and an ETA from their mean epoch time. `summary`: the finished runs of
each experiment, best first. (`--compare` and `--plot` are `mlexp compare`.)
"""

from __future__ import annotations

import math
import time
from typing import Any

from mlexp.query import FINISHED, RunRecord, fetch_runs, latest_step, mlflow_client, resolve_experiments


def total_epochs(run: RunRecord) -> int | None:
    """The epochs the run will train: effective `epochs`, capped by the linear probe's limit."""
    try:
        epochs = int(float(run.param("epochs") or ""))
    except ValueError:
        return None
    if run.tags.get("mlexp.strategy", run.param("strategy")) == "linear" and run.param("linear_probe_epochs"):
        epochs = min(epochs, int(float(run.param("linear_probe_epochs"))))
    return epochs


def describe(run: RunRecord) -> str:
    """backbone/init/strategy from mlexp's tags (the run name when they are missing)."""
    parts = [run.tags.get(f"mlexp.{name}") for name in ("backbone", "init", "strategy")]
    return "/".join(parts) if all(parts) else run.run_name


def clock(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def progress(client_or_uri: Any = None, experiments: list[str] | None = None, now: float | None = None) -> str:
    """RUNNING runs: epoch of total, latest val acc, mean epoch time, ETA, time since start."""
    client = mlflow_client(client_or_uri)
    names = resolve_experiments(client, experiments)
    if not names:
        return "No experiments."
    runs, histories = fetch_runs(client, list(names), "attributes.status = 'RUNNING'",
                                 ("val/acc", "train/loss", "epoch/time_s"))
    if not runs:
        return f"No runs in progress in {', '.join(names.values())}."
    now = time.time() if now is None else now
    rows = []
    for run in sorted(runs, key=lambda r: (names.get(r.experiment_id, ""), r.start_time or 0)):
        done = latest_step(histories, run.run_id, "val/acc", "train/loss")
        total = total_epochs(run)
        epoch_times = [value for _, value in histories["epoch/time_s"].get(run.run_id, [])]
        mean_epoch = sum(epoch_times) / len(epoch_times) if epoch_times else None
        eta = mean_epoch * max(total - done, 0) if mean_epoch is not None and total else None
        rows.append({"experiment": names.get(run.experiment_id, run.experiment_id), "run": run.run_name,
                     "run id": run.run_id[:8], "model": describe(run),
                     "epoch": f"{done}/{total if total else '?'}" if done or total else "-",
                     "val acc": pct(run.metrics.get("val/acc")), "epoch time": clock(mean_epoch), "ETA": clock(eta),
                     "running for": clock(now - run.start_time / 1000) if run.start_time else "-"})
    return f"{len(rows)} run(s) in progress\n\n" + table(rows)


def summary(client_or_uri: Any = None, experiments: list[str] | None = None) -> str:
    """Finished runs per experiment, best validation accuracy first, and counts of the others."""
    client = mlflow_client(client_or_uri)
    names = resolve_experiments(client, experiments)
    if not names:
        return "No experiments."
    runs, histories = fetch_runs(client, list(names), None, ("val/acc",),
                                 wants_history=lambda run: run.status == FINISHED)
    sections = []
    for experiment_id, name in names.items():
        mine = [run for run in runs if run.experiment_id == experiment_id]
        finished = [run for run in mine if run.status == FINISHED and "val/acc" in run.metrics]
        others: dict[str, int] = {}
        for run in mine:
            if run.status != FINISHED:
                others[run.status] = others.get(run.status, 0) + 1
        if not finished and not others and not experiments:
            continue  # all experiments were asked for: leave out those without training runs
        finished.sort(key=lambda run: -run.metrics.get("best/val_acc", run.metrics["val/acc"]))
        rows = [{"run": run.run_name, "run id": run.run_id[:8],
                 "backbone": run.tags.get("mlexp.backbone", run.param("backbone") or "-"),
                 "init": run.tags.get("mlexp.init", run.param("init") or "-"),
                 "strategy": run.tags.get("mlexp.strategy", run.param("strategy") or "-"),
                 "best val acc": pct(run.metrics.get("best/val_acc", run.metrics["val/acc"])),
                 "best epoch": str(int(run.metrics["best/epoch"])) if "best/epoch" in run.metrics else "-",
                 "epochs": str(latest_step(histories, run.run_id, "val/acc") or "-"),
                 "time": clock(run.metrics.get("time/total_s"))} for run in finished]
        counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(others.items()))
        head = f"{name}: {len(rows)} finished training run(s)" + (f"; also {counts}" if counts else "")
        sections.append(head + ("\n\n" + table(rows) if rows else ""))
    return "\n\n".join(sections) or "No runs."
