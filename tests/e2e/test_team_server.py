"""The team set-up: an `mlflow server` on a real PostgreSQL backend store (tests/e2e/conftest.py)
with served artifacts, and a --parallel 2 sweep writing to it (the load a shared server sees)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from mlexp.tracking.local_server import start_local_server, stop_local_server
from tests.e2e.test_sweep_launch import parallel_2_sweep


@pytest.mark.slow
def test_a_parallel_sweep_against_a_team_server_on_postgresql(postgres_uri, tmp_path):
    proc, uri = start_local_server(tmp_path / "server", backend=postgres_uri)
    try:
        parallel_2_sweep(uri, "1,2", "team", tmp_path)
        assert MlflowClient(uri).get_experiment_by_name("team").artifact_location.startswith("mlflow-artifacts:")  # served
    finally:
        stop_local_server(proc)
