"""Helpers for the fault tests: a real `mlflow server` that can be stopped and brought back,
tiny trainings as real processes, and the completeness check every fault must pass."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient

from mlexp.tracking.local_server import start_local_server, stop_local_server
from tests.helpers import WARM_STARTER, artifact_paths, contract_artifacts, steps
from tests.warm_start import WarmProcess

# A 0.4 M-parameter ResNet at 16 px: a whole epoch of digits in about a second on one core.
TINY = ["--backbone", "test_resnet", "--init", "scratch", "--data", "digits", "--img-size", "16",
        "--scratch-epochs-mult", "1", "--calibrate", "false"]
DIGITS_TRAIN = 1437
BATCH_METRICS = ("batch/loss", "batch/lr", "batch/samples_per_s")
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "epoch/time_s", "epoch/lr")


class RestartableServer:
    """A real `mlflow server` on a fixed 127.0.0.1 port, stopped and started like a real outage."""

    def __init__(self, root: Path, artifacts: Path | None = None, **server_options):
        """`server_options`: start_local_server's own (backend, app_name, env), kept for restarts."""
        self.root, self.options = root, dict(server_options, artifacts=artifacts)
        root.mkdir(parents=True, exist_ok=True)
        self.proc, self.uri = start_local_server(root, **self.options)
        self.port = int(self.uri.rsplit(":", 1)[1])

    def stop(self) -> None:
        stop_local_server(self.proc)

    def start(self) -> None:
        self.proc, uri = start_local_server(self.root, port=self.port, **self.options)
        assert uri == self.uri


def mlexp_process(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen | WarmProcess:
    """`python -m mlexp ARGS` running, its output (stderr with it) in `.stdout` (started warm: tests/warm_start.py)."""
    return WARM_STARTER.popen(args, env, cwd)


def train_past_epoch_1(experiment: str, epochs: int, batch_size: int, env: dict[str, str],
                       cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    """A tiny training in its own process, read until its first epoch ended: (process, lines seen)."""
    proc = mlexp_process(["train", *TINY, "--epochs", str(epochs), "--batch-size", str(batch_size),
                          "--experiment", experiment], env, cwd)
    seen: list[str] = []
    read_until(proc, "epoch   1", seen)
    return proc, seen


def read_until(proc: subprocess.Popen, prefix: str, seen: list[str], timeout_s: float = 300) -> None:
    """Read the process's output (kept in `seen`) until a line starting with `prefix`."""
    deadline = time.time() + timeout_s
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return
        assert time.time() < deadline, f"no line {prefix!r} in time"
    raise AssertionError(f"the process ended before printing {prefix!r}:\n{''.join(seen)[-3000:]}")


def only_run(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=100)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_complete(client: MlflowClient, run_id: str, epochs: int, batch_size: int) -> None:
    """FINISHED, exactly one point per optimizer step and per epoch, every artifact of the contract."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("mlexp.error")
    total_steps = epochs * (DIGITS_TRAIN // batch_size)
    for key in BATCH_METRICS:  # sorted steps of every stored point: a duplicate or a gap breaks equality
        assert steps(client, run_id, key) == list(range(1, total_steps + 1)), key
    for key in EPOCH_METRICS:
        assert steps(client, run_id, key) == list(range(1, epochs + 1)), key
    assert artifact_paths(client, run_id) == contract_artifacts(epochs)
    assert "mlexp.error" not in run.data.tags
    # Its two logged models, once each and complete, and its splits as dataset inputs.
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert sorted((m.name, str(m.status)) for m in models) == [("best", "READY"), ("final", "READY")]
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["digits-train", "digits-val"]
