"""Claims on a real MLflow store: who may train a configuration, and when a claim is free
again; and SQLite's "database is locked", retried rather than failing a run."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlexp.tracking import claims, server


def test_a_claim_is_taken_over_only_when_its_trainer_is_gone(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("claims")
    parent = client.create_run(experiment_id).info.run_id
    first = claims.claim(client, experiment_id, parent, "h1", "launcher-a")
    assert first is not None and first.number == 1
    assert claims.claim(client, experiment_id, parent, "h1", "launcher-b") is None  # fresh claim, no run yet

    child, created = claims.child_run(client, experiment_id, parent, "h1", "child", {})
    assert created and claims.child_run(client, experiment_id, parent, "h1", "child", {}) == (child, False)
    client.set_tag(child, "mlexp.heartbeat_s", "30")
    client.set_tag(child, "mlexp.heartbeat", str(claims.now_ms()))
    assert claims.claim(client, experiment_id, parent, "h1", "launcher-b") is None  # its trainer beats

    client.set_tag(child, "mlexp.heartbeat", str(claims.now_ms() + 1))
    state = claims.read_state(client, experiment_id, parent)
    assert state.held_elsewhere("h1", "launcher-b", now=time.time() + 46) is None  # silent 1.5 periods: gone
    assert state.held_elsewhere("h1", "launcher-b", now=time.time() + 40) == "launcher-a"

    client.set_terminated(child, "KILLED")  # interrupted: free, the next attempt resumes the same run
    taken = claims.claim(client, experiment_id, parent, "h1", "launcher-b")
    assert taken is not None and taken.number == 2 and taken.owner == "launcher-b"
    assert claims.child_run(client, experiment_id, parent, "h1", "child", {}) == (child, False)

    client.set_terminated(child, "FAILED")
    assert claims.claim(client, experiment_id, parent, "h1", "launcher-c") is None
    assert claims.claim(client, experiment_id, parent, "h1", "launcher-c", retry_failed=True).number == 3
    client.set_terminated(child, "FINISHED")
    assert claims.claim(client, experiment_id, parent, "h1", "launcher-c", retry_failed=True) is None
    assert sorted(claims.attempts(client.get_run(parent).data.params).values(), key=lambda a: a.number)[-1] \
        .owner == "launcher-c"


def test_a_launcher_arriving_mid_race_joins_the_candidate_that_wins(sqlite_uri):
    """The moment between two launchers creating their candidate parents and either creating
    the lock: a third launcher must not pick a parent on its own, or two parents result."""
    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("mid-race")
    tags = {claims.GRID_TAG: "g1"}
    first = client.create_run(experiment_id, tags=tags, start_time=1000).info.run_id  # launcher A's candidate
    second = client.create_run(experiment_id, tags=tags, start_time=2000).info.run_id  # launcher B's candidate

    def never():
        raise AssertionError("a launcher that finds candidates creates none")

    late, created = claims.sweep_parent(client, experiment_id, "g1", never)
    assert (late, created) == (first, False)  # the oldest candidate, decided by creating the lock
    lock = f"{claims.LOCK_PREFIX}/{experiment_id}/sweep-g1"
    # B, finishing its own race, tries to name its candidate in the lock: too late
    with pytest.raises(MlflowException, match="already exists"):
        client.create_experiment(lock, tags={"mlexp.parent_run_id": second})
    assert claims.lock_value(client, lock) == first
    assert claims.decide(client, lock, second) == first and claims.decide(client, lock, first) == first
    later, _ = claims.sweep_parent(client, experiment_id, "g1", never)
    assert later == first


def test_a_locked_sqlite_store_is_retried_and_explained_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(server, "_told_locked", False)  # as in a fresh process
    db = tmp_path / "busy.db"
    sqlite3.connect(db).execute("create table t (x)").connection.commit()
    holder = sqlite3.connect(db, check_same_thread=False)
    holder.execute("begin exclusive")  # another process writing: every other writer is refused
    threading.Timer(1.0, holder.rollback).start()

    def write() -> int:
        with sqlite3.connect(db, timeout=0) as connection:
            return connection.execute("insert into t values (1)").rowcount

    started = time.monotonic()
    assert server.retry_when_locked(write) == 1
    assert time.monotonic() - started >= 0.9
    assert server.retry_when_locked(write) == 1
    told = capsys.readouterr().err
    assert told.count("database is locked") == 1 and "mlflow server" in told
