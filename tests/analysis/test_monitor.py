"""The training monitor (--progress, --summary) against real MLflow stores."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid

import pytest
from mlflow import MlflowClient

from mlexp.analysis.monitor import progress, reap, summary, total_epochs
from mlexp.analysis.query import RunRecord
from mlexp.errors import MlexpError
from mlexp.tracking import open_run
from tests.run_factory import log_run


def test_progress_shows_epoch_of_total_val_acc_and_eta(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    start_ms = int(time.time() * 1000) - 3_600_000
    log_run(client, "mon", val_acc=[0.8, 0.9], name="done")
    log_run(client, "mon", init="scratch", val_acc=[0.31, 0.42], epochs=5, epoch_time=12.0, status="RUNNING",
            name="busy", start_time=start_ms, heartbeat=start_ms + 60_000)
    log_run(client, "other", val_acc=[0.5], epochs=4, status="RUNNING", name="elsewhere")

    text = progress(client, ["mon"], now=start_ms / 1000 + 65)
    assert "1 run(s) in progress" in text
    (row,) = [line for line in text.splitlines() if line.startswith("mon ")]
    # epoch 2 of 5 (effective epochs), 42.0% val acc, 12 s epochs, 3 left -> 36 s, started 65 s ago
    for expected in ("busy", "running", "resnet18/scratch/full", "2/5", "42.0%", "0m12s", "0m36s", "1m05s"):
        assert expected in row
    # Its heartbeat is 5 s old; 50 s later (past 1.5 periods of 30 s) it is lost, with no ETA.
    (later,) = [line for line in progress(client, ["mon"], now=start_ms / 1000 + 115).splitlines()
                if line.startswith("mon ")]
    assert "lost (last beat 0m55s ago)" in later and "0m36s" not in later
    assert "done" not in text and "elsewhere" not in text
    assert "elsewhere" in progress(client)  # no experiment named: all of them


def test_progress_shows_a_running_sweep_and_its_children(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    now_ms = int(time.time() * 1000)
    parent = client.create_run(client.create_experiment("grid"), run_name="sweep resnet18 (8 runs)",
                               tags={"mlexp.sweep": "true", "mlexp.sweep_size": "8"}).info.run_id
    for key, value in {"finished": 3, "running": 2, "failed": 1, "remaining": 2}.items():
        client.log_metric(parent, f"sweep/{key}", value, step=4)
    log_run(client, "grid", val_acc=[0.5], epochs=3, status="RUNNING", name="resnet18_scratch-full-s4",
            heartbeat=now_ms, tags={"mlflow.parentRunId": parent})
    text = progress(client, ["grid"])
    assert f"sweep resnet18 (8 runs) ({parent[:8]}, grid): 3 of 8 done, 2 running, 1 failed, 2 remaining" \
        in text
    assert "1 run(s) in progress" in text and "resnet18_scratch-full-s4" in text


def test_progress_and_summary_edge_cases(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    log_run(client, "quiet", val_acc=[0.5])
    assert progress(client, ["quiet"]) == "No runs in progress in quiet."
    with pytest.raises(MlexpError, match="no MLflow experiment 'missing'"):
        progress(client, ["missing"])
    with pytest.raises(MlexpError, match="no MLflow experiment 'missing'"):
        summary(client, ["missing"])
    linear = RunRecord("r", "r", "0", "RUNNING", params={"epochs": "20", "linear_probe_epochs": "10"},
                       tags={"mlexp.strategy": "linear"})
    assert total_epochs(linear) == 10  # the linear probe stops at linear_probe_epochs
    scratch = RunRecord("r", "r", "0", "RUNNING", params={"epochs": "10", "effective.epochs": "12"})
    assert total_epochs(scratch) == 12  # under `mlflow run` the adjusted value is effective.epochs


def test_summary_lists_finished_runs_best_first(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    log_run(client, "sum", val_acc=[0.5, 0.7, 0.8], name="good", epoch_time=10.0)
    log_run(client, "sum", backbone="vit_small", init="scratch", strategy="linear", val_acc=[0.6, 0.95, 0.9],
            name="best")
    log_run(client, "sum", val_acc=[0.1], status="FAILED", name="broken")
    log_run(client, "sum", val_acc=[0.1], status="RUNNING", name="busy")
    text = summary(client, ["sum"])
    lines = text.splitlines()
    assert lines[0] == "sum: 2 finished training run(s); also 1 failed, 1 running"
    best = next(i for i, line in enumerate(lines) if line.startswith("best "))
    good = next(i for i, line in enumerate(lines) if line.startswith("good "))
    assert best < good
    assert "vit_small" in lines[best] and "95.0%" in lines[best] and "linear" in lines[best]
    assert lines[good].split()[-4:] == ["80.0%", "3", "3", "0m30s"]  # best acc, best epoch, epochs, time
    assert "broken" not in text


def test_progress_against_live_server(server_uri):
    client = MlflowClient(server_uri)
    experiment = f"mon-live-{uuid.uuid4().hex[:6]}"
    log_run(client, experiment, val_acc=[0.25, 0.5, 0.75], epochs=6, status="RUNNING", name="live")
    text = progress(server_uri, [experiment])
    (row,) = [line for line in text.splitlines() if line.startswith(experiment)]
    assert "3/6" in row and "75.0%" in row and "0m30s" in row  # 3 epochs of 10 s left
    assert "live: " not in summary(server_uri, [experiment]) and "0 finished" in summary(server_uri, [experiment])


def test_reap_says_what_is_known_of_a_silent_run_beyond_its_missing_heartbeat(sqlite_uri, monkeypatch):
    """A run whose outbox broke mid-training (here: its records table dropped) cannot beat:
    its heartbeat thread writes the problem straight to the server, and `reap` shows it with
    the state of the run's process (this test's own: alive, yet silent: its tracker is stopped)."""
    monkeypatch.setenv("MLEXP_HEARTBEAT_S", "0.2")
    tracker = open_run(sqlite_uri, "silent", "broken-outbox")
    client = MlflowClient(sqlite_uri)

    def wait_for(tag: str) -> None:
        deadline = time.time() + 60
        while tag not in client.get_run(tracker.run_id).data.tags:
            assert time.time() < deadline, f"{tag} never reached the server"
            time.sleep(0.05)

    wait_for("mlexp.process")  # the records the damage below would drop are on the server
    with sqlite3.connect(tracker.outbox.folder / "outbox.db") as damage:
        damage.execute("DROP TABLE records")
    wait_for("mlexp.last_problem")
    tracker._beats.set()  # the beats stop and the outbox's lock goes, as a killed process's would
    tracker.sender.stop()
    tracker.outbox.unlock()
    time.sleep(0.5)  # more than 1.5 periods of silence

    [line] = reap(sqlite_uri, ["silent"])
    assert f"({tracker.run_id}) FAILED: no heartbeat since" in line
    assert f"its process (pid {os.getpid()}) on this machine is still alive but silent" in line
    assert "its last problem: its heartbeat could not be written to the outbox (no such table: records)" in line
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "its last problem: its heartbeat" in run.data.tags["mlexp.error"]
