"""The tracking seam against real stores: the outbox, its sender, resume dedupe, offline runs."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlexp.tracking import open_run, params_to_log
from mlexp.tracking.outbox import Outbox, all_outboxes
from mlexp.tracking.server import batch_of
from mlexp.tracking.sync import sync
from mlexp.tracking.writer import COMMIT_CALLS


def history_steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_batch_metrics_are_batched_ordered_and_complete(server_uri):
    tracker = open_run(server_uri, "tracking-test", "batched")
    start = time.perf_counter()
    for step in range(1, 2501):
        tracker.log_metrics({"batch/loss": 1.0 / step, "batch/lr": 0.1}, step=step)
    tracker.log_metrics({"diverged": float("nan"), "exploded": float("inf")}, step=1)  # SQLite has no NaN
    enqueue_s = time.perf_counter() - start
    delivery = tracker.finish("FINISHED")
    assert delivery.complete
    client = MlflowClient(server_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert history_steps(client, tracker.run_id, "batch/loss") == list(range(1, 2501))
    # MLflow keeps NaN, and stores +inf as the largest float
    assert math.isnan(run.data.metrics["diverged"]) and run.data.metrics["exploded"] == sys.float_info.max
    # 5,000 points were committed to the outbox without waiting on the server
    assert enqueue_s < 5.0
    assert list(all_outboxes()) == []  # delivered: the outbox is gone


def test_log_calls_only_buffer_and_whatever_depends_on_them_commits_them_first(sqlite_uri, monkeypatch):
    """The training thread appends; the writer thread group-commits. A checkpoint remembered
    for resume (or published, or the run's end) is never durable before the points logged
    before it."""
    monkeypatch.setenv("MLEXP_COMMIT_S", "3600")  # no commit but the forced ones
    tracker = open_run(sqlite_uri, "tracking-test", "buffered")
    for step in range(1, 101):
        tracker.log_metrics({"batch/loss": 1.0 / step}, step=step)
    assert tracker.outbox.max_steps() == {}  # logged, not yet in the outbox
    tracker.remember("checkpoint", {"epoch": 1})
    assert tracker.outbox.max_steps() == {"batch/loss": 100}
    tracker.log_metrics({"batch/loss": 0.001}, step=101)
    assert tracker.finish("FINISHED").complete
    assert history_steps(MlflowClient(sqlite_uri), tracker.run_id, "batch/loss") == list(range(1, 102))


def test_the_writer_commits_by_itself_each_window_and_when_the_buffer_fills(sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLEXP_COMMIT_S", "0.05")
    tracker = open_run(sqlite_uri, "tracking-test", "windowed")
    tracker.log_metrics({"batch/loss": 1.0}, step=1)
    deadline = time.monotonic() + 30
    while tracker.outbox.max_steps() != {"batch/loss": 1}:
        assert time.monotonic() < deadline, "the writer never committed the window's points"
        time.sleep(0.02)
    tracker.points.window_s = 3600  # from the next window on: only a full buffer wakes the writer
    time.sleep(0.1)
    for step in range(2, 2 + COMMIT_CALLS):
        tracker.log_metrics({"batch/loss": 1.0}, step=step)
    while tracker.outbox.max_steps()["batch/loss"] < 1 + COMMIT_CALLS:
        assert time.monotonic() < deadline, "a full buffer did not wake the writer"
        time.sleep(0.02)
    assert tracker.finish("FINISHED").complete


def test_resumed_tracker_drops_points_already_logged(sqlite_uri):
    first = open_run(sqlite_uri, "tracking-test", "resume")
    for step in range(1, 11):
        first.log_metrics({"batch/loss": float(step)}, step=step)
    first.finish("KILLED")
    client = MlflowClient(sqlite_uri)
    resumed = open_run(sqlite_uri, "tracking-test", None, resume_run_id=first.run_id)
    resumed.mark_running()
    for step in range(6, 16):  # the re-run overlaps steps 6..10
        resumed.log_metrics({"batch/loss": float(step)}, step=step)
    resumed.finish("FINISHED")
    assert history_steps(client, first.run_id, "batch/loss") == list(range(1, 16))
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_failed_run_ends_failed_with_its_error(sqlite_uri):
    tracker = open_run(sqlite_uri, "tracking-test", "fails")
    tracker.finish("FAILED", error="ValueError: boom")
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlexp.error"] == "ValueError: boom"


def test_abandoned_resume_leaves_the_status_alone(sqlite_uri):
    first = open_run(sqlite_uri, "tracking-test", "abandon")
    first.finish("FAILED", error="first failure")
    again = open_run(sqlite_uri, "tracking-test", None, resume_run_id=first.run_id)
    again.abandon()
    run = MlflowClient(sqlite_uri).get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags["mlexp.error"] == "first failure"


@pytest.mark.parametrize("queued", ["apart", "together"])
def test_a_refused_param_is_kept_aside_and_the_rest_arrives(sqlite_uri, queued):
    tracker = open_run(sqlite_uri, "tracking-test", "refused")
    tracker.log_params({"lr": "0.1"})
    client = MlflowClient(sqlite_uri)
    deadline = time.monotonic() + 60  # a sender that never delivers fails below, not hangs here
    while queued == "apart" and time.monotonic() < deadline and "lr" not in client.get_run(tracker.run_id).data.params:
        time.sleep(0.05)
    tracker.outbox.add_texts("param", {"lr": "0.2"})  # MLflow refuses to change a param
    tracker.log_metrics({"m": 1.0}, step=1)
    delivery = tracker.finish("FINISHED")
    assert client.get_run(tracker.run_id).data.params["lr"] == "0.1"
    assert history_steps(client, tracker.run_id, "m") == [1]
    assert delivery.pending.rejected == 1  # not silently dropped: kept in the outbox and reported
    refused = json.loads(Outbox.find(tracker.run_id).rejected()[0][0])  # kept whole
    assert (refused["kind"], refused["key"], refused["text"]) == ("param", "lr", "0.2")


def test_one_request_never_holds_two_values_of_a_param():
    rows = [(1, "param", "lr", "0.1", None, 0, None), (2, "metric", "m", None, 1.0, 0, 1),
            (3, "tag", "t", "a", None, 0, None), (4, "tag", "t", "b", None, 0, None),
            (5, "param", "lr", "0.2", None, 0, None), (6, "param", "wd", "0", None, 0, None)]
    assert [row[0] for row in batch_of(rows)] == [1, 2, 3, 4]  # the changed lr goes alone, next
    assert [row[0] for row in batch_of(rows[4:])] == [5, 6]


def test_offline_run_is_recorded_locally_then_synced_once(unmade_sqlite_uri, tmp_path):
    sqlite_uri = unmade_sqlite_uri
    tracker = open_run("", "offline-test", "offline-run", offline=True, tags={"mlexp.kind": "t"})
    tracker.log_params({"lr": "0.1"})
    for step in range(1, 6):
        tracker.log_metrics({"batch/loss": 1.0 / step}, step=step)
    folder = tracker.staging_dir("notes")
    (folder / "notes.txt").write_text("hello")
    tracker.log_artifacts(folder, "notes")
    delivery = tracker.finish("FINISHED")
    assert delivery.offline and not delivery.complete
    assert not (tmp_path / "mlflow.db").exists()  # nothing touched a store

    first = sync(tracker.local_id, to=sqlite_uri, echo=lambda line: None)
    again = sync(every=True, to=sqlite_uri, echo=lambda line: None)
    assert first[0].complete and again == []
    client = MlflowClient(sqlite_uri)
    runs = client.search_runs([client.get_experiment_by_name("offline-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "offline-run"
    assert run.data.params == {"lr": "0.1"} and run.data.tags["mlexp.local_id"] == tracker.local_id
    assert history_steps(client, run.info.run_id, "batch/loss") == [1, 2, 3, 4, 5]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/notes.txt"]


def test_effective_values_that_mlflow_run_already_logged_differently_get_a_prefix():
    logged = params_to_log({"backbone": "resnet18_pretrained", "lr": "0.001", "epochs": "3", "new": "x", "aa": ""},
                           {"backbone": "resnet18", "lr": "1e-3", "epochs": "3", "aa": "''"})
    assert logged == {"effective.backbone": "resnet18_pretrained", "new": "x"}


def test_ending_a_run_that_already_ended_on_this_machine_changes_nothing(sqlite_uri):
    """A run that finished while the server was away looks lost there; reaping it must not
    turn its FINISHED (still waiting in its outbox) into FAILED."""
    from mlexp.tracking import end_run

    tracker = open_run(sqlite_uri, "tracking-test", "ended-here", heartbeat=False)
    tracker.sender.stop()  # as if the server had gone away: nothing more is sent
    tracker.outbox.set_status("FINISHED")
    tracker.outbox.unlock()
    assert end_run(sqlite_uri, tracker.run_id, "FAILED", "lost") is None
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "RUNNING"
    delivered = sync(tracker.run_id, echo=lambda line: None)
    assert delivered[0].complete
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_newer_checkpoint_replaces_unsent_older_ones(tmp_path):
    tracker = open_run("", "tracking-test", "superseded", offline=True)

    def queue(epoch: int) -> None:
        tracker.supersede("checkpoints/last")
        folder = tracker.staging_dir(f"last-{epoch}")
        (folder / "state.bin").write_bytes(b"x" * 1000)
        tracker.log_artifacts(folder, f"checkpoints/last/epoch_{epoch:04d}")

    def queued() -> list[str]:
        return [row[0] for row in tracker.outbox.connection().execute("SELECT artifact_path FROM files ORDER BY seq")]

    queue(1)
    [(first,)] = tracker.outbox.connection().execute("SELECT seq FROM files").fetchall()
    assert tracker.outbox.claim_file_op(first)  # the sender is uploading epoch 1: it stays
    queue(2)
    queue(3)  # epoch 2 was never sent: epoch 3 replaces it
    assert queued() == ["checkpoints/last/epoch_0001", "checkpoints/last/epoch_0003"]
    tracker.outbox.release_file_op()
    queue(4)  # epoch 1 is no longer in flight: it goes too
    assert queued() == ["checkpoints/last/epoch_0004"]
    assert not tracker.outbox.claim_file_op(first)  # a sender holding a replaced op looks again
    # a best checkpoint is queued before the older unsent ones go: a kill in between leaves one
    for epoch in (1, 2):
        folder = tracker.staging_dir(f"best-{epoch}")
        (folder / "model.bin").write_bytes(b"b" * 100)
        tracker.log_artifacts(folder, "checkpoints/best")
        tracker.supersede("checkpoints/best", keep_newest=True)
    rows = tracker.outbox.connection().execute("SELECT artifact_path, local_path FROM files ORDER BY seq").fetchall()
    assert [path for path, _ in rows] == ["checkpoints/last/epoch_0004", "checkpoints/best"]
    assert Path(rows[1][1]).name.endswith("best-2")
    assert sorted(path.name.rsplit("-", 2)[-2] for path in tracker.outbox.files_dir.iterdir()) == ["best", "last"]
    tracker.finish("FINISHED")


def test_an_upload_whose_files_vanished_is_kept_aside_not_delivered(sqlite_uri):
    import shutil

    tracker = open_run(sqlite_uri, "tracking-test", "vanished", heartbeat=False)
    tracker.sender.stop()
    folder = tracker.staging_dir("gone")
    (folder / "a.txt").write_text("a")
    tracker.log_artifacts(folder, "gone")
    shutil.rmtree(folder)
    tracker.outbox.unlock()
    result = sync(tracker.run_id, echo=lambda line: None)[0]
    assert not result.complete and result.after.rejected == 1
    assert MlflowClient(sqlite_uri).list_artifacts(tracker.run_id, "gone") == []
    assert "is missing" in Outbox.find(tracker.run_id).rejected()[0][1]


def test_a_logged_model_published_again_after_its_output_was_linked_completes(sqlite_uri, tmp_path):
    """A sender cut off after linking the model as its run's output (its grace ran out on a
    slow server) leaves the operation to the next sender, which must complete it: the store
    refuses the same link twice (SQLite's UNIQUE constraint, PostgreSQL's duplicate key)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from mlexp.tracking import lineage

    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment("retry")).info.run_id
    folder = tmp_path / "model"
    folder.mkdir()
    Model().save(str(folder / "MLmodel"))
    (folder / "weights.bin").write_bytes(b"w" * 100)
    first = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="best", source_run_id=run_id)
    client.log_outputs(run_id, [LoggedModelOutput(first.model_id, step=3)])  # where the first sender stopped

    model_id = lineage.publish_logged_model(client, run_id, folder, {"name": "best", "step": 3})
    assert model_id == first.model_id
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    assert [output.model_id for output in client.get_run(run_id).outputs.model_outputs] == [model_id]
    assert "weights.bin" in [f.path for f in client.list_logged_model_artifacts(model_id)]


def test_two_runs_logging_the_same_datasets_at_once_both_get_them(server_uri):
    """A parallel sweep's children log identical splits into one experiment at the same moment:
    MLflow's store can refuse the second insert of a dataset; both runs must still get it."""
    import threading

    from mlexp.tracking import lineage

    client = MlflowClient(server_uri)
    experiment = client.create_experiment("dataset-race")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    rounds = 12
    for round_ in range(rounds):
        splits = [{"context": "train", "name": f"set{round_}-train", "digest": f"d{round_:04d}",
                   "source": "/data", "num_images": 10, "num_classes": 2}]
        start = threading.Barrier(2)
        errors = []

        def log(run_id: str) -> None:
            start.wait()
            try:
                lineage.log_inputs(client, run_id, splits, [])
            except Exception as error:  # noqa: BLE001 - collected and asserted on below
                errors.append(error)

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
    for run_id in runs:
        assert len(client.get_run(run_id).inputs.dataset_inputs) == rounds
