"""The training monitor, answered from the tracking server.

`progress`: the runs still training, how far along (epoch of total), their latest
validation accuracy and an ETA from their mean epoch time. A run whose heartbeat stopped
(its process was killed, its machine lost) is shown as `lost`, with its last beat, and no
ETA; `reap` ends such runs FAILED with `mlexp.error` saying why (they stay resumable).
`summary`: the finished runs of each experiment, best first. (Plots: `mlexp compare`.)
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

from mlexp import tracking
from mlexp.analysis.query import FINISHED, RunRecord, fetch_runs, latest_step, mlflow_client, resolve_experiments
from mlexp.analysis.scores import ACCURACY, SCORES, Score, score_of
from mlexp.errors import MlexpError
from mlexp.option_values import best_is_max
from mlexp.sweep.progress import clock


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


def pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


LOST_AFTER_PERIODS = 1.5  # a live run beats every period; 1.5 periods of silence means it is gone


def last_beat(run: RunRecord) -> float | None:
    """Seconds since the epoch of the run's last heartbeat; its start for a run with none yet."""
    beat = run.tags.get("mlexp.heartbeat")
    if beat:
        return int(beat) / 1000
    return run.start_time / 1000 if run.start_time and "mlexp.version" in run.tags else None


def is_lost(run: RunRecord, now: float) -> bool:
    """A RUNNING mlexp run whose heartbeat stopped for more than LOST_AFTER_PERIODS periods."""
    beat = last_beat(run)
    if run.status != "RUNNING" or beat is None:
        return False
    period = float(run.tags.get("mlexp.heartbeat_s", "30"))
    return now - beat > LOST_AFTER_PERIODS * period


def lost_runs(client_or_uri: Any = None, experiments: list[str] | None = None, now: float | None = None) -> list:
    client = mlflow_client(client_or_uri)
    names = resolve_experiments(client, experiments)
    if not names:
        return []
    runs, _ = fetch_runs(client, list(names), "attributes.status = 'RUNNING'", ())
    now = time.time() if now is None else now
    return [run for run in runs if is_lost(run, now)]


def process_state(run: RunRecord) -> str:
    """Where the run's process ran, and whether it is gone (known only on its own machine)."""
    host, _, pid = run.tags.get("mlexp.process", "").rpartition(":")
    if not pid.isdigit():
        return ""
    if host != socket.gethostname():
        return f"it ran on {host} (pid {pid})"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its process (pid {pid}) on this machine is gone"
    except PermissionError:
        pass  # another user's process of that pid: alive
    return f"its process (pid {pid}) on this machine is still alive but silent"


def known_cause(run: RunRecord) -> str:
    """What is known of why a lost run fell silent, beyond its missing heartbeat."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_beat(run)))
    parts = [f"no heartbeat since {since}", process_state(run)]
    if run.tags.get("mlexp.last_problem"):
        parts.append(f"its last problem: {run.tags['mlexp.last_problem']}")
    return "; ".join(part for part in parts if part)


def reap(tracking_uri: str, experiments: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """End every lost run FAILED, saying why; returns one line per run."""

    lines = []
    for run in lost_runs(tracking_uri, experiments):
        cause = known_cause(run)
        if not dry_run:
            reason = (f"lost: {cause} (the process was killed or its machine lost); "
                      f"reaped by `mlexp reap`; `mlexp train --resume {run.run_id}` continues it")
            if tracking.end_run(tracking_uri, run.run_id, "FAILED", reason, tags={"mlexp.reaped": "true"}) is None:
                lines.append(f"left {run.run_name} ({run.run_id}) alone: it ended on this machine and its results "
                             f"wait in its outbox; `mlexp sync --run {run.run_id}` sends them")
                continue
        lines.append(f"{'would mark' if dry_run else 'marked'} {run.run_name} ({run.run_id}) FAILED: {cause}")
    return lines


def progress(client_or_uri: Any = None, experiments: list[str] | None = None, now: float | None = None) -> str:
    """RUNNING runs: epoch of total, latest val acc, mean epoch time, ETA, time since start."""
    client = mlflow_client(client_or_uri)
    names = resolve_experiments(client, experiments)
    if not names:
        return "No experiments."
    runs, histories = fetch_runs(client, list(names), "attributes.status = 'RUNNING'",
                                 (*CURVES, "train/loss", "epoch/time_s"))
    if not runs:
        return f"No runs in progress in {', '.join(names.values())}."
    now = time.time() if now is None else now
    sweeps = [run for run in runs if run.tags.get("mlexp.sweep") == "true"]
    runs = [run for run in runs if run not in sweeps]
    rows, column = [], score_column(runs, "val")
    for run in sorted(runs, key=lambda r: (names.get(r.experiment_id, ""), r.start_time or 0)):
        done = latest_step(histories, run.run_id, run_score(run).curve, "train/loss")
        total = total_epochs(run)
        epoch_times = [value for _, value in histories["epoch/time_s"].get(run.run_id, [])]
        mean_epoch = sum(epoch_times) / len(epoch_times) if epoch_times else None
        lost = is_lost(run, now)
        eta = mean_epoch * max(total - done, 0) if mean_epoch is not None and total and not lost else None
        state = f"lost (last beat {clock(now - last_beat(run))} ago)" if lost else "running"
        rows.append({"experiment": names.get(run.experiment_id, run.experiment_id), "run": run.run_name,
                     "run id": run.run_id[:8], "state": state, "model": describe(run),
                     "epoch": f"{done}/{total if total else '?'}" if done or total else "-",
                     column: said(run, run.metrics.get(run_score(run).curve)), "epoch time": clock(mean_epoch),
                     "ETA": clock(eta),
                     "running for": clock(now - run.start_time / 1000) if run.start_time else "-"})
    lost = sum(row["state"] != "running" for row in rows)
    note = (f"\n\n{lost} lost run(s): their process stopped without ending them. `mlexp reap` marks them "
            "FAILED; `mlexp train --resume RUN_ID` continues one.") if lost else ""
    head = "".join(sweep_line(run, names) + "\n" for run in sweeps)
    return head + f"{len(rows)} run(s) in progress" + ("\n\n" + table(rows) if rows else "") + note


CURVES = tuple(score.curve for score in SCORES.values())


def run_score(run: RunRecord) -> Score:
    """What the run's task is scored by: accuracy, a detector's mAP, or (a task of the user's
    own) the validation metric the run chose its best epoch by."""
    task = run.param("task") or "classification"
    if task in SCORES:
        return SCORES[task]
    try:
        return score_of({task}, {task: run.param("best_metric") or ""})
    except MlexpError:  # a run that chose by no validation metric: nothing to rank it by
        return ACCURACY


def best_score(run: RunRecord) -> float:
    score = run_score(run)
    return run.metrics.get(score.best, run.metrics[score.curve])


def ranking(run: RunRecord) -> float:
    """Best first: a higher score, or a lower one where the run chose its best epoch by a minimum."""
    score = run_score(run)
    higher = score in SCORES.values() or best_is_max(score.curve, run.param("best_mode") or "auto")
    return -best_score(run) if higher else best_score(run)


def score_column(runs: list[RunRecord], prefix: str) -> str:
    """"val acc" over classifiers alone (as always); "val score" when a detector is among them."""
    return f"{prefix} acc" if all(run_score(run) is ACCURACY for run in runs) else f"{prefix} score"


def said(run: RunRecord, value: float | None) -> str:
    """A score as a percentage; a detector's says that it is mAP; a user's task's metric, as it is."""
    score = run_score(run)
    if score not in SCORES.values():
        return "-" if value is None else f"{value:.4f} {score.label}"
    return pct(value) if score is ACCURACY or value is None else f"{pct(value)} {score.label}"


def sweep_line(run: RunRecord, names: dict[str, str]) -> str:
    """A running sweep's counts, as its launcher last logged them on the parent run."""
    counts = {what: int(run.metrics.get(f"sweep/{what}", 0)) for what in ("finished", "running", "failed", "remaining")}
    size = run.tags.get("mlexp.sweep_size", "?")
    name = run.run_name if run.run_name.startswith("sweep") else f"sweep {run.run_name}"
    return (f"{name} ({run.run_id[:8]}, {names.get(run.experiment_id, run.experiment_id)}): "
            f"{counts['finished']} of {size} done, {counts['running']} running, {counts['failed']} failed, "
            f"{counts['remaining']} remaining")


def summary(client_or_uri: Any = None, experiments: list[str] | None = None) -> str:
    """Finished runs per experiment, best validation accuracy first, and counts of the others."""
    client = mlflow_client(client_or_uri)
    names = resolve_experiments(client, experiments)
    if not names:
        return "No experiments."
    runs, histories = fetch_runs(client, list(names), None, CURVES,
                                 wants_history=lambda run: run.status == FINISHED)
    sections = []
    for experiment_id, name in names.items():
        mine = [run for run in runs if run.experiment_id == experiment_id]
        finished = [run for run in mine if run.status == FINISHED and run_score(run).curve in run.metrics]
        others: dict[str, int] = {}
        for run in mine:
            if run.status != FINISHED:
                others[run.status] = others.get(run.status, 0) + 1
        if not finished and not others and not experiments:
            continue  # all experiments were asked for: leave out those without training runs
        finished.sort(key=ranking)
        column = score_column(finished, "best val")
        rows = [{"run": run.run_name, "run id": run.run_id[:8],
                 "backbone": run.tags.get("mlexp.backbone", run.param("backbone") or "-"),
                 "init": run.tags.get("mlexp.init", run.param("init") or "-"),
                 "strategy": run.tags.get("mlexp.strategy", run.param("strategy") or "-"),
                 column: said(run, best_score(run)),
                 "best epoch": str(int(run.metrics["best/epoch"])) if "best/epoch" in run.metrics else "-",
                 "epochs": str(latest_step(histories, run.run_id, run_score(run).curve) or "-"),
                 "time": clock(run.metrics.get("time/total_s"))} for run in finished]
        counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(others.items()))
        head = f"{name}: {len(rows)} finished training run(s)" + (f"; also {counts}" if counts else "")
        sections.append(head + ("\n\n" + table(rows) if rows else ""))
    return "\n\n".join(sections) or "No runs."
