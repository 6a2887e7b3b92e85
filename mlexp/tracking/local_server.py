"""Start a local `mlflow server` the fast way (tests, benchmarks, a laptop).

One uvicorn worker and no job execution: MLflow's defaults (4 workers) take ~24 s and ~3 GB
to start and add ~45 ms to every keep-alive request; this starts in seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_server(root: Path, timeout_s: float = 120.0, port: int | None = None,
                       artifacts: Path | None = None, nice: int = 0,
                       backend: str | None = None, app_name: str | None = None,
                       env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A server on 127.0.0.1 storing into `root` (SQLite + artifacts); returns (process, URI).

    `port`: a given port (to restart a stopped server where its clients expect it).
    `artifacts`: where uploaded artifacts go (default: root/artifacts).
    `backend`: another backend store URI (postgresql://..., a team server's).
    `nice`: run the server at a lower CPU priority (a benchmark's stand-in for a server on
    another machine: its work then takes only CPU time the training leaves idle).
    `app_name`: MLflow's --app-name (basic-auth: users and permissions); `env`: more variables
    for the server (MLFLOW_AUTH_CONFIG_PATH).
    """
    root = Path(root).resolve()  # the server runs with cwd=root: relative paths would nest
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    artifacts = Path(artifacts) if artifacts else root / "artifacts"
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(artifacts),
         *(["--app-name", app_name] if app_name else [])],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, preexec_fn=(lambda: os.nice(nice)) if nice else None,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {})))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}") from None
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"mlflow server did not start in {timeout_s:.0f} s")


def stop_local_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
