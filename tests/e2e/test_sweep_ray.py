"""`mlexp sweep --executor ray` on a real local Ray instance (2 CPUs, 127.0.0.1), as a user
would start one with `ray start --head`; a worker SIGKILLed mid-training; then a sweep of a
network of the user's own, and a tuning study's workers, on the same cluster."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import save_file

from mlexp.models.weight_sources import file_sha256
from mlexp.tracking import claims
from mlexp.tracking.local_server import free_port
from tests.e2e.test_sweep_launch import GRID, assert_each_trained_once, logs_of, sweep_runs
from tests.helpers import subprocess_env

pytest.importorskip("ray")
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_address() -> str:
    port = free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True,
                   timeout=180, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=180)


def trainer_of(run_id: str) -> tuple[int, int]:
    """(pid, parent pid) of the `mlexp train` process training `run_id`: its parent is the Ray worker."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"train" in args and b"--run-id" in args and args[args.index(b"--run-id") + 1] == run_id.encode():
            return int(proc.name), ppid
    raise AssertionError(f"no training process for run {run_id}")


def wait_for_epoch_1(folder: Path, timeout_s: float = 300) -> str:
    """The run id of the first child whose log shows its first epoch (its first checkpoint is being written)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for log in (folder / "mlexp-output" / "sweeps").glob("*/*.log"):
            text = log.read_text()
            if "\nepoch   1 " in text:
                return re.search(r"--run-id (\w+)", text).group(1)
        time.sleep(0.2)
    raise AssertionError("no child reached the end of its first epoch")


@pytest.mark.slow
def test_ray_trains_the_grid_and_a_killed_worker_resumes_the_same_run(server_uri, tmp_path, ray_address):
    """The four configurations through Ray, at 3 epochs (one is too short to kill in the middle),
    with one child's Ray worker SIGKILLed in the middle of its training: Ray runs its task again,
    which takes the next claim attempt and resumes the same run from its last checkpoint."""
    env = subprocess_env(server_uri)
    args = [*GRID[:-2], "--batch-size", "16", "--seeds", "1,2,3,4", "--epochs", "3", "--experiment", "ray-grid",
            "--executor", "ray", "--ray-address", ray_address]
    launcher = subprocess.Popen([sys.executable, "-m", "mlexp", *args], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = wait_for_epoch_1(tmp_path)
    _, worker = trainer_of(victim)
    os.kill(worker, signal.SIGKILL)
    output = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 0, output[-3000:]
    assert "as Ray tasks on 1 node(s), up to 2 at a time, 1 CPU(s) each" in output
    client = MlflowClient(server_uri)
    parent, children = sweep_runs(client, "ray-grid")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert victim in {run.info.run_id for run in children}  # never a second run
    assert_each_trained_once(client, children, epochs=3, batch=16)  # one batch/loss point per step
    [killed] = [run for run in children if run.info.run_id == victim]
    attempts = [key for key in parent.data.params if key.startswith(f"{claims.CLAIM}.{killed.data.tags['mlexp.config_hash']}.")]
    assert len(attempts) == 2  # the first run of the task, and Ray's retry
    [log] = [log for log in logs_of(tmp_path, parent.info.run_id) if f"--run-id {victim}" in log.read_text()]
    assert log.read_text().count("$ ") == 2 and ("mlexp: resuming run" in log.read_text()
                                                 or "starting it over" in log.read_text())

    # On the same cluster, a network of the user's own (tests/own_model/mymodels.py, in the folder the
    # sweep is started from), pretrained from the weights folder as in the README's "Your own model".
    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "own_model" / "mymodels.py", project / "mymodels.py")
    sys.path.insert(0, str(project))
    try:
        import mymodels

        save_file(mymodels.twistnet_tiny(num_classes=10).state_dict(), project / "weights" / "twistnet_tiny.safetensors")
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("mymodels", None)
    own = subprocess.run([sys.executable, "-m", "mlexp", "sweep", "--backbones", "mymodels:twistnet_tiny", "--inits",
                          "pretrained,scratch", *GRID[5:-2], "--batch-size", "64", "--seeds", "1,2", "--epochs", "1",
                          "--log-models", "false", "--experiment", "ray-own", "--executor", "ray", "--ray-address",
                          ray_address], env=env, cwd=project, capture_output=True, text=True, timeout=600)
    assert own.returncode == 0, own.stdout[-3000:] + own.stderr[-3000:]
    _, own_children = sweep_runs(client, "ray-own")
    assert sorted((run.data.tags["mlexp.init"], run.info.status) for run in own_children) == [
        ("pretrained", "FINISHED"), ("pretrained", "FINISHED"), ("scratch", "FINISHED"), ("scratch", "FINISHED")]
    exported = file_sha256(project / "weights" / "twistnet_tiny.safetensors")
    assert all(run.data.params["weights_sha256"] == exported for run in own_children
               if run.data.tags["mlexp.init"] == "pretrained")

    # On the same cluster, a tuning study whose two workers are Ray tasks: each trial once, every
    # trial and final run nested under the study's parent on the tracking server.
    study = subprocess.run([sys.executable, "-m", "mlexp", "tune", "--backbones", "test_resnet", "--inits", "scratch",
                            "--space", "lr=0.003,0.03", "--sampler", "grid", "--trials", "2", "--epochs", "1",
                            "--pruner", "none", "--final-seeds", "1", "--data", "digits", "--img-size", "16",
                            "--calibrate", "false", "--log-models", "false",
                            "--system-metrics", "false", "--experiment", "ray-tune", "--executor", "ray",
                            "--ray-address", ray_address, "--parallel", "2"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    assert "as Ray tasks on 1 node(s), up to 2 at a time, 1 CPU(s) each" in study.stdout
    runs = client.search_runs([client.get_experiment_by_name("ray-tune").experiment_id])
    [study_parent] = [run for run in runs if run.data.tags.get("mlexp.kind") == "study"]
    trials = [run for run in runs if run.data.tags.get("mlexp.study_stage") == "trial"]
    assert sorted(run.data.tags["mlexp.trial_number"] for run in trials) == ["0", "1"]
    assert sorted(float(run.data.params["lr"]) for run in trials) == [0.003, 0.03]
    nested = [run for run in runs if run.data.tags.get("mlexp.study_stage") in ("trial", "final")]
    assert len(nested) == 3 and {run.data.tags["mlflow.parentRunId"] for run in nested} == {study_parent.info.run_id}
    assert {run.info.status for run in nested} == {"FINISHED"} and study_parent.info.status == "FINISHED"
    assert len(list((tmp_path / "mlexp-output" / "tune").glob("study-*/workers/worker-*.log"))) == 2
