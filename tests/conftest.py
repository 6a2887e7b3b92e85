"""Shared fixtures: real MLflow stores (SQLite in a temp folder) and a real `mlflow server`."""

from __future__ import annotations

import os
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first (a stable sort keeps each group in file order). `make
    test` runs two test processes with pytest-xdist's worksteal: each starts with half the
    list and, once its own half is done, takes half of what the other has left, so the long
    tests are shared out and the short ones fill the end. (`--dist load` hands each process
    fixed batches up front: in a fresh clone one process then ran its long tests alone for
    minutes, 22.9 minutes in all at 148% CPU.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def own_outbox(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and the processes it starts) gets its own outbox folder, never ~/.local."""
    folder = tmp_path_factory.mktemp("outbox")
    monkeypatch.setenv("MLEXP_OUTBOX_DIR", str(folder))
    return folder


@pytest.fixture
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite-backed MLflow store, set as the tracking URI for this test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
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
