"""What the end-to-end tests share: one real PostgreSQL server per test process (Debian's
binaries, in a temporary folder, on 127.0.0.1), and a fresh database of it for each test
that asks (starting a cluster costs seconds; a database, a fraction of one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlexp.tracking.local_server import free_port


@dataclass
class Postgres:
    """A running cluster: its binaries, port and data folder; `sql` runs a statement as postgres."""

    bin_dir: Path
    port: int
    data: Path

    def sql(self, statement: str, database: str = "postgres") -> str:
        done = subprocess.run([self.bin_dir / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", statement],
                              check=True, capture_output=True, text=True, timeout=60)
        return done.stdout.strip()

    def new_database(self, owner: str = "postgres") -> str:
        """A fresh, empty database; its URI (no password: the cluster trusts 127.0.0.1)."""
        name = f"mlflow_{uuid.uuid4().hex[:10]}"
        self.sql(f"CREATE DATABASE {name} OWNER {owner}")
        return f"postgresql://{owner}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Postgres:
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
        yield Postgres(bin_dir, port, folder / "data")
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_uri(postgres: Postgres) -> str:
    """A fresh database on the shared PostgreSQL server."""
    return postgres.new_database()
