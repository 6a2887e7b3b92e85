"""A damaged outbox is reported with what can still be read, moved aside, its whole checkpoints
sent, and never holds back the healthy outboxes beside it; a malformed record is kept aside
with its reason and the rest of its run delivered. Real SQLite outboxes, a real MLflow store."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

from mlflow import MlflowClient

from mlexp.tracking.outbox import Outbox
from mlexp.tracking.sync import sync


def outbox_of_a_run(client: MlflowClient, uri: str, name: str, checkpoint: bool = False) -> Outbox:
    """A run on the server and its outbox holding 5 metric points, a param and (optionally) a
    whole checkpoint of epoch 1, as a run killed during an outage leaves them."""
    run_id = client.create_run(client.get_experiment_by_name("damage").experiment_id, run_name=name).info.run_id
    box = Outbox.create(run_id, run_id=run_id, tracking_uri=uri, experiment="damage", experiment_id=None,
                        run_name=name)
    box.add_metrics([("val/acc", 0.1 * step, 1_000 + step, step) for step in range(1, 6)])
    box.add_texts("param", {"lr": "0.001"})
    if checkpoint:
        folder = box.staging_dir("last-1")
        (folder / "model.safetensors").write_bytes(os.urandom(4096))
        (folder / "training_state.pt").write_bytes(os.urandom(1024))
        files = {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
                 for path in folder.iterdir()}
        (folder / "manifest.json").write_text(json.dumps({"epoch": 1, "global_step": 44, "folder": "epoch_0001",
                                                          "files": files}))
        box.add_upload(folder, "checkpoints/last/epoch_0001")
    box.close()
    return box


def test_damaged_outboxes_are_reported_quarantined_and_never_block_the_healthy_ones(sqlite_uri, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("MLEXP_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("MLEXP_SYNC_STALL_S", "5")
    client = MlflowClient(sqlite_uri)
    client.create_experiment("damage")
    truncated = outbox_of_a_run(client, sqlite_uri, "truncated", checkpoint=True)
    overwritten = outbox_of_a_run(client, sqlite_uri, "overwritten", checkpoint=True)
    malformed = outbox_of_a_run(client, sqlite_uri, "malformed")
    not_a_number = outbox_of_a_run(client, sqlite_uri, "not-a-number")
    healthy = outbox_of_a_run(client, sqlite_uri, "healthy", checkpoint=True)
    with open(truncated.db_path, "r+b") as handle:
        handle.truncate(truncated.db_path.stat().st_size // 3)
    for path in (overwritten.db_path, overwritten.db_path.with_name("outbox.db-wal")):
        if path.exists():
            path.write_bytes(os.urandom(path.stat().st_size or 4096))
    with sqlite3.connect(malformed.db_path) as db:
        db.execute("UPDATE records SET kind = 'garbage' WHERE step = 3")
    with sqlite3.connect(not_a_number.db_path) as db:
        db.execute("UPDATE records SET num = 'abc' WHERE step = 2")

    checked: list[str] = []
    sync(every=True, dry_run=True, echo=checked.append)  # the check: said, nothing moved or sent
    assert sum("outbox damaged (" in line and "would move it aside" in line for line in checked) == 2
    assert truncated.folder.exists() and overwritten.folder.exists()

    lines: list[str] = []
    results = sync(every=True, echo=lines.append)

    said = "\n".join(lines)
    for box in (truncated, overwritten):  # reported with what is recoverable, moved aside, checkpoint sent
        [line] = [line for line in lines if line.startswith(box.folder.name)]
        assert "outbox damaged (" in line and "whole checkpoint(s)" in line and ".damaged-" in line, line
        assert "1 whole checkpoint(s)" in line and "sent 1 whole checkpoint(s)" in line, line
        assert not box.folder.exists() and len(list(box.folder.parent.glob(f"{box.folder.name}.damaged-*"))) == 1
        paths = {item.path for item in client.list_artifacts(box.folder.name, "checkpoints/last/epoch_0001")}
        assert paths == {f"checkpoints/last/epoch_0001/{name}" for name in
                         ("model.safetensors", "training_state.pt", "manifest.json")}
    # the rest of a run with a malformed record arrives; the record is kept aside with its reason
    for box, step, reason in ((malformed, 3, "unknown record kind 'garbage'"),
                              (not_a_number, 2, "metric 'val/acc' is not a number ('abc')")):
        history = [point.step for point in client.get_metric_history(box.folder.name, "val/acc")]
        assert sorted(history) == [s for s in range(1, 6) if s != step], (box.folder.name, history)
        assert client.get_run(box.folder.name).data.params == {"lr": "0.001"}
        assert reason in said
    assert len(client.get_metric_history(healthy.folder.name, "val/acc")) == 5
    assert client.list_artifacts(healthy.folder.name, "checkpoints/last/epoch_0001")
    assert not healthy.folder.exists()  # delivered whole: its outbox is gone
    assert sum(result.damaged for result in results) == 2
