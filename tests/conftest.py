"""Shared fixtures: real MLflow stores (SQLite in a temp folder) and a real `mlflow server`."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from mlexp.tracking.local_server import start_local_server, stop_local_server

# Nothing in the test suite may wait on a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("TQDM_DISABLE", "1")

# Under pytest-xdist two test processes share the 2 cores: one torch thread each, in-process and
# in every process a test starts (two OpenMP pools of 2 spinning threads on 2 cores run many
# times slower, not 2x).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# The tests that take minutes (on 2 cores), longest first: each test process starts on one of
# them, so no process is left running one alone at the end. A name that no longer matches
# only loses its place in the queue.
LONGEST = ("test_every_training_entry_point_gives_the_cli_config", "test_credentials_train_and_are_written_nowhere",
           "test_own_model_pretrain_sweep_ablation_resume_and_serve",
           "test_sigkill_at_twenty_two_moments_then_resume_gives_the_uninterrupted_model",
           "test_ray_trains_the_grid_and_a_killed_worker_resumes_the_same_run",
           "test_sweep_skip_finished_failures_then_compare_on_a_live_server",
           "test_a_run_becomes_a_registered_served_evaluated_model",
           "test_a_sweep_over_official_partitions_trains_each_on_its_files_lines")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heavy tests (end-to-end, or marked slow) first, shared out between the test processes.

    `make test` runs two test processes with pytest-xdist's worksteal: each starts with its
    contiguous share of this list and, once its own share is done, takes the end of what another
    has left. So each share starts with every n-th heavy test (the longest first) and ends with
    unit tests, which are what gets stolen and what fills the end. (`--dist load` hands out fixed
    batches up front: in a fresh clone one process then ran its long tests alone for minutes.)"""
    def heavy(item: pytest.Item) -> bool:
        return "e2e" in item.path.parts or item.get_closest_marker("slow") is not None

    def rank(item: pytest.Item) -> int:
        name = item.name.split("[", 1)[0]
        return LONGEST.index(name) if name in LONGEST else len(LONGEST)

    heavy_items = sorted((item for item in items if heavy(item)), key=rank)
    light_items = [item for item in items if not heavy(item)]
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    shares, left = [heavy_items[k::workers] for k in range(workers)], len(items)
    for index, share in enumerate(shares):
        size = left // (workers - index)  # xdist's first split: what is left, evenly
        left -= size
        take = max(0, size - len(share))
        share += light_items[:take]
        del light_items[:take]
    items[:] = [item for share in shares for item in share] + light_items


@pytest.fixture(autouse=True)
def own_outbox(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and the processes it starts) gets its own outbox folder, never ~/.local."""
    folder = tmp_path_factory.mktemp("outbox")
    monkeypatch.setenv("MLEXP_OUTBOX_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store as MLflow creates it (its schema, its Default experiment), made once
    per test process: creating the schema takes about a second, copying the file a millisecond."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # here: only tests with a store need it

    folder = tmp_path_factory.mktemp("empty-store")
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns")).engine.dispose()
    return folder / "mlflow.db"


@pytest.fixture
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> str:
    """A fresh SQLite-backed MLflow store, set as the tracking URI for this test: a copy of the
    empty store, its Default experiment's folder where MLflow puts it for a store made here."""
    store = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, store)
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(tmp_path / "mlruns" / "0"),))
    return tracking_into(store, monkeypatch)


@pytest.fixture
def unmade_sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tracking URI of a SQLite store not made yet (for tests that check nothing makes it)."""
    return tracking_into(tmp_path / "mlflow.db", monkeypatch)


def tracking_into(store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`store` as this test's tracking URI, the test running in its folder."""
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(store.parent)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real `mlflow server` on 127.0.0.1 (one worker: starts in seconds), shared by the session."""
    proc, uri = start_local_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_local_server(proc)


@pytest.fixture
def server_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The live server, set as this test's tracking URI, with the test running in a temp folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    return mlflow_server
