"""The background tracker against a real SQLite store and a real server."""

from __future__ import annotations

import time

from mlflow import MlflowClient

from mlexp.tracking import MlflowTracker, last_logged_steps, open_run, params_to_log


def history_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_batch_metrics_are_batched_ordered_and_complete(server_uri):
    tracker = open_run(server_uri, "tracking-test", "batched")
    start = time.perf_counter()
    for step in range(1, 2501):
        tracker.log_metrics({"batch/loss": 1.0 / step, "batch/lr": 0.1}, step=step)
    enqueue_s = time.perf_counter() - start
    tracker.finish("FINISHED")
    client = MlflowClient(server_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert history_steps(client, tracker.run_id, "batch/loss") == list(range(1, 2501))
    # 5,000 points were queued without waiting on the server (one request per point would take minutes)
    assert enqueue_s < 5.0


def test_resumed_tracker_drops_points_already_logged(sqlite_uri):
    first = open_run(sqlite_uri, "tracking-test", "resume")
    for step in range(1, 11):
        first.log_metrics({"batch/loss": float(step)}, step=step)
    first.flush()
    client = MlflowClient(sqlite_uri)
    assert last_logged_steps(client, first.run_id) == {"batch/loss": 10}
    resumed = MlflowTracker(client, first.run_id, last_logged_steps(client, first.run_id))
    for step in range(6, 16):  # the re-run overlaps steps 6..10
        resumed.log_metrics({"batch/loss": float(step)}, step=step)
    resumed.finish("FINISHED")
    assert history_steps(client, first.run_id, "batch/loss") == list(range(1, 16))


def test_failed_run_ends_failed_with_its_error(sqlite_uri):
    tracker = open_run(sqlite_uri, "tracking-test", "fails")
    tracker.finish("FAILED", error="ValueError: boom")
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlexp.error"] == "ValueError: boom"


def test_effective_values_that_mlflow_run_already_logged_differently_get_a_prefix():
    logged = params_to_log({"backbone": "resnet18_pretrained", "lr": "0.001", "epochs": "3", "new": "x", "aa": ""},
                           {"backbone": "resnet18", "lr": "1e-3", "epochs": "3", "aa": "''"})
    assert logged == {"effective.backbone": "resnet18_pretrained", "new": "x"}
