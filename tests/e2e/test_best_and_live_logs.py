"""Best by any metric, a best checkpoint that resumes, and logs you can `tail` while a run
trains: real processes, a real SQLite store or a live `mlflow server`, timm's test_resnet."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from mlflow import MlflowClient

from tests.faults import TINY, mlexp_process
from tests.helpers import run_mlexp, runs_of, subprocess_env

BATCH = 64
STEPS_PER_EPOCH = 1437 // BATCH  # digits' training split; the last partial batch is dropped


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {point.step: point.value for point in client.get_metric_history(run_id, key)}


def test_the_best_checkpoint_is_the_epoch_of_the_lowest_val_loss(sqlite_uri, tmp_path):
    done = run_mlexp(["train", *TINY, "--epochs", "4", "--batch-size", str(BATCH), "--best-metric", "val/loss",
                      "--best-mode", "min", "--best-checkpoint", "full", "--log-models", "false",
                      "--system-metrics", "false", "--experiment", "by-loss"], subprocess_env(sqlite_uri), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "by-loss")
    losses = history(client, run.info.run_id, "val/loss")
    lowest = min(losses, key=losses.get)
    assert run.data.metrics["best/epoch"] == lowest and run.data.metrics["best/val_loss"] == losses[lowest]
    assert run.data.metrics["best/val_acc"] == history(client, run.info.run_id, "val/acc")[lowest]
    manifest = json.loads(Path(client.download_artifacts(run.info.run_id, "checkpoints/best/state/manifest.json",
                                                         str(tmp_path))).read_text())
    assert manifest["epoch"] == lowest
    assert run.data.params["best_metric"] == "val/loss" and run.data.params["best_mode"] == "min"


def test_a_full_best_checkpoint_resumes_exactly_where_the_best_epoch_left_off(sqlite_uri, tmp_path):
    # The highest val/loss is the first epoch's (the worst, on purpose: a best epoch before the last one)
    env = subprocess_env(sqlite_uri)
    done = run_mlexp(["train", *TINY, "--epochs", "3", "--batch-size", str(BATCH), "--best-metric", "val/loss",
                      "--best-mode", "max", "--best-checkpoint", "full", "--log-models", "false",
                      "--system-metrics", "false", "--experiment", "branch"], env, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = MlflowClient(sqlite_uri)
    [first] = runs_of(client, "branch")
    best = int(first.data.metrics["best/epoch"])
    assert best < 3
    done = run_mlexp(["train", "--resume", first.info.run_id, "--resume-from", "best"], env, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"continuing run {first.info.run_id}'s best epoch ({best})" in done.stdout
    [second] = [run for run in runs_of(client, "branch") if run.info.run_id != first.info.run_id]
    assert second.info.status == "FINISHED"
    assert second.data.tags["mlexp.resumed_from"] == f"{first.info.run_id} best epoch {best}"
    # the optimizer, scheduler and random states came back: the epochs after the best are trained again exactly
    for key in ("val/loss", "train/loss", "epoch/lr"):
        assert history(client, second.info.run_id, key) == history(client, first.info.run_id, key)
    assert min(point.step for point in client.get_metric_history(second.info.run_id, "batch/loss")) == \
        best * STEPS_PER_EPOCH + 1


def read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def test_live_logs_grow_while_training_and_a_killed_run_resumes_without_duplicates(server_uri, tmp_path):
    epochs, kill_step = 4, 2 * STEPS_PER_EPOCH + 5  # SIGKILL in the middle of epoch 3
    env = subprocess_env(server_uri, MLEXP_FAULT=f"step={kill_step}")
    proc = mlexp_process(["train", *TINY, "--epochs", str(epochs), "--batch-size", str(BATCH), "--log-models",
                          "false", "--system-metrics", "false", "--experiment", "live"], env, tmp_path)
    runs = tmp_path / "mlexp-output" / "runs"
    seen_at: dict[str, float] = {}  # epoch -> when its row was first in the file
    while proc.poll() is None:
        for folder in runs.glob("*") if runs.is_dir() else []:
            for row in read_rows(folder / "epoch_metrics.csv"):
                seen_at.setdefault(row["epoch"], time.time())
        time.sleep(0.05)
    output = proc.stdout.read()
    assert proc.returncode == -9, output[-2000:]
    [folder] = list(runs.iterdir())
    rows = read_rows(folder / "epoch_metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"] and set(seen_at) == {"1", "2"}
    for row in rows:  # each row was on disk within 2 s of its epoch's end (its timestamp)
        from datetime import datetime
        ended = datetime.fromisoformat(row["timestamp"]).timestamp()
        assert seen_at[row["epoch"]] - ended < 2.0, (row["epoch"], seen_at[row["epoch"]] - ended)
    killed_steps = [int(row["step"]) for row in read_rows(folder / "batch_metrics.csv")]
    assert killed_steps[:2 * STEPS_PER_EPOCH] == list(range(1, 2 * STEPS_PER_EPOCH + 1))

    done = run_mlexp(["train", "--resume", folder.name], subprocess_env(server_uri), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = read_rows(folder / "epoch_metrics.csv")
    assert [int(row["epoch"]) for row in rows] == list(range(1, epochs + 1))
    assert [int(row["step"]) for row in read_rows(folder / "batch_metrics.csv")] == \
        list(range(1, epochs * STEPS_PER_EPOCH + 1))
    events = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [event["epoch"] for event in events if event["event"] == "epoch"] == list(range(1, epochs + 1))
    assert [event["event"] for event in events if event["event"] != "epoch"] == ["start", "resume", "end"]
    assert events[-1]["status"] == "FINISHED"
    # the same columns and numbers as the artifact the run logged at its end
    client = MlflowClient(server_uri)
    logged = read_rows(Path(client.download_artifacts(folder.name, "metrics/epoch_metrics.csv", str(tmp_path))))
    assert [{k: v for k, v in row.items() if k != "timestamp"} for row in logged] == \
        [{k: v for k, v in row.items() if k != "timestamp"} for row in rows]
