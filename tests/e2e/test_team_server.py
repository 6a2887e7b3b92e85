"""The team set-up: an `mlflow server` on a real PostgreSQL backend store with served
artifacts, and a --parallel 2 sweep writing to it (the load a shared server sees)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlexp.tracking.local_server import free_port, start_local_server, stop_local_server
from tests.e2e.test_sweep_launch import parallel_2_sweep


@pytest.fixture
def postgres_uri():
    """A real PostgreSQL server (Debian's binaries) in a temporary folder, on 127.0.0.1."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        if os.environ.get("MLEXP_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here but not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    bin_dir = initdb[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="mlexp-pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, bin_dir / "initdb", "-D", folder / "data", "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    port = free_port()
    server = subprocess.Popen([*as_postgres, bin_dir / "postgres", "-D", folder / "data", "-p", str(port), "-k",
                               folder, "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while subprocess.run([bin_dir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and server.poll() is None, "PostgreSQL did not start"
            time.sleep(0.3)
        subprocess.run([*as_postgres, bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "mlflow"], check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_parallel_sweep_against_a_team_server_on_postgresql(postgres_uri, tmp_path):
    proc, uri = start_local_server(tmp_path / "server", backend=postgres_uri)
    try:
        parallel_2_sweep(uri, "1,2", "team", tmp_path)
        assert MlflowClient(uri).get_experiment_by_name("team").artifact_location.startswith("mlflow-artifacts:")  # served
    finally:
        stop_local_server(proc)
