"""Nothing lost, nothing false: real faults against real `mlflow server` processes.

Outages (the server stopped and restarted), SIGKILLs at chosen moments (MLEXP_FAULT, see
mlexp/faults.py, or a kill from outside), an artifact store that refuses writes, offline
runs, dead runs. Each test checks what the user was told (exit code, output) and what the
server ends up holding: every point once, every artifact, the true status.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from mlexp.analysis import monitor
from mlexp.tracking.outbox import Outbox
from tests.faults import (
    DIGITS_TRAIN,
    TINY,
    RestartableServer,
    assert_complete,
    only_run,
    read_until,
    train_past_epoch_1,
)
from tests.helpers import artifact_paths, run_mlexp, steps, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture
def own_server(tmp_path):
    server = RestartableServer(tmp_path / "server")
    yield server
    server.stop()


def test_server_stopped_30s_during_epoch_2_loses_nothing(own_server, tmp_path):
    env = subprocess_env(own_server.uri, MLEXP_GRACE_S="60")
    proc, seen = train_past_epoch_1("outage30", 4, 8, env, tmp_path)
    own_server.stop()  # epoch 2 trains against a dead server
    stopped = time.time()
    read_until(proc, "epoch   4", seen)
    trained = time.time()
    time.sleep(max(0.0, 30 - (time.time() - stopped)))
    own_server.start()
    rest = proc.communicate(timeout=120)[0]
    output = "".join(seen) + rest
    assert proc.returncode == 0, output[-3000:]
    assert time.time() - trained < 60 + 15  # no hang past the grace period
    assert output.count("is not taking writes") == 1 and output.count("is back after") == 1
    assert "FINISHED: best val acc" in output
    client = MlflowClient(own_server.uri)
    assert_complete(client, only_run(client, "outage30").info.run_id, epochs=4, batch_size=8)


def test_server_gone_longer_than_training_then_sync(own_server, tmp_path):
    env = subprocess_env(own_server.uri, MLEXP_GRACE_S="3")
    proc, seen = train_past_epoch_1("outage-long", 3, 16, env, tmp_path)
    own_server.stop()
    output = "".join(seen) + proc.communicate(timeout=300)[0]
    # Its own work succeeded: exit 0, but no claim that the server has the results.
    assert proc.returncode == 0, output[-3000:]
    assert "FINISHED: best val acc" not in output and "does not have everything yet" in output
    run_id = output.split("mlexp: run ", 1)[1].split(":", 1)[0]

    own_server.start()
    client = MlflowClient(own_server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # true: the server was never told otherwise
    synced = run_mlexp(["sync", "--run", run_id], env, tmp_path)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert f"({run_id}): sent" in synced.stdout
    assert_complete(client, run_id, epochs=3, batch_size=16)
    again = run_mlexp(["sync", "--all"], env, tmp_path)
    assert again.returncode == 0 and "nothing to sync" in again.stdout


# Twenty-two moments over two epochs of 22 steps: during steps, during evaluation, before each
# checkpoint file's upload, before each manifest, during the final uploads, half-way through
# publishing a logged model, and before the final status. They are chained: each chain starts
# with a fresh run killed at its first moment, then the same run is resumed and killed at the
# next moment, and so on; its last resume finishes it, and its final weights must be the
# uninterrupted run's. A moment is reached again after a resume as it would be by a user's
# resume: a run killed before its first checkpoint starts over; an upload, manifest or logged
# model the killed process had not sent is sent by the next one (its outbox); steps continue
# from the checkpoint. `eval=N` counts this process's evaluations, so eval=2 heads a chain.
KILL_CHAINS = [
    ["upload=config.json", "step=1", "step=10", "step=15", "step=22", "eval=1",
     "upload=checkpoints/best/model.safetensors"],
    ["upload=checkpoints/last/epoch_0001/model.safetensors", "upload=checkpoints/last/epoch_0001/training_state.pt",
     "upload=checkpoints/last/epoch_0001/manifest.json", "manifest=1", "step=23", "step=33", "step=44"],
    ["eval=2", "upload=checkpoints/last/epoch_0002/model.safetensors",
     "upload=checkpoints/last/epoch_0002/training_state.pt", "manifest=2",
     "upload=checkpoints/final/model.safetensors", "upload=metrics/batch_metrics.csv",
     "logged_model=best",  # the logged model created on the server, its files not yet uploaded
     "status=FINISHED"],  # everything on the server but the final status
]
KILL_MOMENTS = [moment for chain in KILL_CHAINS for moment in chain]


def test_sigkill_at_twenty_two_moments_then_resume_gives_the_uninterrupted_model(server_uri, tmp_path):
    args = ["train", *TINY, "--epochs", "2", "--batch-size", "64", "--seed", "7"]
    env = subprocess_env(server_uri, MLEXP_CHECKPOINT_UPLOAD_S="0")  # every epoch's checkpoint goes up: kill it there
    baseline = run_mlexp([*args, "--experiment", "kill-baseline"], env, tmp_path)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    client = MlflowClient(server_uri)
    expected = final_weights(client, only_run(client, "kill-baseline").info.run_id, tmp_path / "baseline")

    def kill_resume_and_kill_again(index: int) -> list[str]:
        chain, experiment = KILL_CHAINS[index], f"kill-chain-{index}"
        killed = run_mlexp([*args, "--experiment", experiment], dict(env, MLEXP_FAULT=chain[0]), tmp_path)
        assert killed.returncode == -signal.SIGKILL, f"{chain[0]}: not reached ({killed.returncode})"
        run_id = only_run(client, experiment).info.run_id
        outputs = [killed.stdout]
        for before, moment in zip(chain, chain[1:]):
            again = run_mlexp(["train", "--resume", run_id], dict(env, MLEXP_FAULT=moment), tmp_path)
            assert again.returncode == -signal.SIGKILL, f"{moment} (after {before}): not reached " \
                                                        f"({again.returncode}): {again.stderr[-2000:]}"
            if before == "manifest=1":  # files on the server, manifest never published: the folder's own one counts
                assert "after epoch 1 " in again.stdout, again.stdout
            outputs.append(again.stdout)
        resumed = run_mlexp(["train", "--resume", run_id], env, tmp_path)
        assert resumed.returncode == 0, f"after {chain[-1]}: {resumed.stderr[-3000:]}"
        assert_complete(client, run_id, epochs=2, batch_size=64)
        assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # one run, every time
        weights = final_weights(client, run_id, tmp_path / experiment)
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(weights[key], value), f"chain {index}: {key} differs from the uninterrupted run"
        return [*outputs, resumed.stdout]

    # Two chains at a time, one thread each (subprocess_env sets OMP_NUM_THREADS=1): 2 cores.
    with ThreadPoolExecutor(2) as pool:
        outputs = [text for chain in pool.map(kill_resume_and_kill_again, range(len(KILL_CHAINS))) for text in chain]
    assert len(KILL_MOMENTS) == len(set(KILL_MOMENTS)) == 22
    # Every path was taken: from a checkpoint, from scratch in the same run, and delivering a finished run.
    assert any("resuming run" in output for output in outputs)
    assert any("starting it over" in output for output in outputs)
    assert any("finished training before" in output for output in outputs)


def test_sigkill_between_a_log_call_and_its_group_commit_then_resume_has_no_gap_and_no_duplicate(
        server_uri, tmp_path):
    """Metric points are buffered and group-committed off the training thread: a kill inside
    the commit window loses the points logged since the last commit, never the ones before a
    checkpoint, and the resumed run logs the lost steps again, once."""
    env = subprocess_env(server_uri, MLEXP_COMMIT_S="3600")  # no commit but the ones the checkpoints force
    steps_per_epoch = DIGITS_TRAIN // 64
    killed = run_mlexp(["train", *TINY, "--epochs", "2", "--batch-size", "64", "--experiment", "kill-window"],
                       dict(env, MLEXP_FAULT=f"logged={steps_per_epoch + 5}"), tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    client = MlflowClient(server_uri)
    run_id = only_run(client, "kill-window").info.run_id
    box = Outbox.find(run_id)
    # The kill landed inside the window: epoch 2's points were logged but never committed;
    # the points before epoch 1's checkpoint were.
    assert box.max_steps()["batch/loss"] == steps_per_epoch
    box.close()
    resumed = run_mlexp(["train", "--resume", run_id], env, tmp_path)
    assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr[-3000:]
    assert_complete(client, run_id, epochs=2, batch_size=64)


@pytest.mark.parametrize("period_s, uploaded", [("0", ["epoch_0001", "epoch_0002", "epoch_0003"]),
                                                ("600", ["epoch_0003"])])
def test_checkpoints_replaced_within_their_upload_period_never_go_up_and_nothing_is_missing(
        period_s, uploaded, own_server, tmp_path):
    """Checkpoints go up at most once per period while training: a newer one replaces an
    unsent older one in the outbox; at the end the newest goes, and the run is complete."""
    env = subprocess_env(own_server.uri, MLEXP_CHECKPOINT_UPLOAD_S=period_s)
    done = run_mlexp(["train", *TINY, "--epochs", "3", "--batch-size", "64", "--experiment", "spaced"], env, tmp_path)
    assert done.returncode == 0 and "FINISHED: best val acc" in done.stdout, done.stderr[-3000:]
    client = MlflowClient(own_server.uri)
    run_id = only_run(client, "spaced").info.run_id
    assert_complete(client, run_id, epochs=3, batch_size=64)
    puts = [line for line in (own_server.root / "server.log").read_text().splitlines()
            if '"PUT ' in line and f"/{run_id}/artifacts/checkpoints/" in line]
    assert sorted({line.split("checkpoints/last/")[1][:10] for line in puts if "checkpoints/last/epoch_" in line}) \
        == uploaded
    best_uploads = sum("checkpoints/best/model.safetensors" in line for line in puts)
    assert best_uploads == 1 if period_s == "600" else best_uploads >= 1


def final_weights(client: MlflowClient, run_id: str, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    return load_file(client.download_artifacts(run_id, "checkpoints/final/model.safetensors", str(folder)))


def test_sigkill_during_an_outage_then_resume_and_sync(own_server, tmp_path):
    env = subprocess_env(own_server.uri, MLEXP_GRACE_S="60")
    proc, seen = train_past_epoch_1("kill-outage", 3, 16, env, tmp_path)
    run_id = only_run(MlflowClient(own_server.uri), "kill-outage").info.run_id
    own_server.stop()
    read_until(proc, "epoch   2", seen)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    own_server.start()
    resumed = run_mlexp(["train", "--resume", run_id], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming run" in resumed.stdout  # from the epoch-2 checkpoint the outbox kept
    synced = run_mlexp(["sync", "--all"], env, tmp_path)
    assert synced.returncode == 0, synced.stdout
    client = MlflowClient(own_server.uri)
    assert_complete(client, run_id, epochs=3, batch_size=16)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


@pytest.mark.parametrize("store", ["local", "server"])
def test_artifact_store_that_refuses_writes(store, tmp_path):
    """Local store with an artifact root that cannot be written (even by root: a file blocks
    the folder), and a server whose uploads answer 500 for the same reason."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the artifact folder should be")
    artifacts = blocker / "artifacts"
    server = None
    if store == "local":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        MlflowClient(uri).create_experiment("refused", artifact_location=str(artifacts))
    else:
        server = RestartableServer(tmp_path / "server", artifacts=artifacts)
        uri = server.uri
    try:
        env = subprocess_env(uri, MLEXP_GRACE_S="3")
        done = run_mlexp(["train", *TINY, "--epochs", "2", "--batch-size", "32", "--experiment", "refused"],
                         env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "FINISHED: best val acc" not in done.stdout and "logged:" not in done.stdout
        assert "artifact operation(s)" in done.stdout  # says what waits
        client = MlflowClient(uri)
        run_id = only_run(client, "refused").info.run_id
        assert steps(client, run_id, "batch/loss") == list(range(1, 2 * (1437 // 32) + 1))  # metrics arrived
        assert client.get_run(run_id).info.status == "RUNNING"  # the status waits behind the artifacts
        still = run_mlexp(["sync", "--run", run_id], dict(env, MLEXP_SYNC_STALL_S="3"), tmp_path)
        assert still.returncode == 1 and "still waiting" in still.stdout  # store not fixed yet: says so

        blocker.unlink()  # the store is fixed
        artifacts.mkdir(parents=True)
        synced = run_mlexp(["sync", "--run", run_id], env, tmp_path)
        assert synced.returncode == 0, synced.stdout + synced.stderr[-2000:]
        assert_complete(client, run_id, epochs=2, batch_size=32)
    finally:
        if server is not None:
            server.stop()


def test_offline_sweep_synced_twice(server_uri, tmp_path):
    env = subprocess_env(server_uri, MLEXP_OFFLINE="1")
    swept = run_mlexp(["sweep", "--backbones", "test_resnet", "--inits", "scratch", "--seeds", "1,2", *TINY[4:],
                       "--epochs", "2", "--batch-size", "64", "--experiment", "offline-sweep"], env, tmp_path)
    assert swept.returncode == 0, swept.stderr[-3000:]
    client = MlflowClient(server_uri)
    assert client.get_experiment_by_name("offline-sweep") is None  # nothing reached the server

    outputs = []
    for _ in range(2):
        synced = run_mlexp(["sync", "--all", "--to", server_uri], subprocess_env(server_uri), tmp_path)
        assert synced.returncode == 0, synced.stdout + synced.stderr[-2000:]
        outputs.append(synced.stdout)
    assert outputs[0].count(": sent") == 3 and "nothing to sync" in outputs[1]
    runs = client.search_runs([client.get_experiment_by_name("offline-sweep").experiment_id])
    assert len(runs) == 3
    [parent] = [run for run in runs if run.data.tags.get("mlexp.sweep") == "true"]
    children = [run for run in runs if run is not parent]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and "summary/sweep_summary.json" in artifact_paths(
        client, parent.info.run_id)
    for child in children:
        assert_complete(client, child.info.run_id, epochs=2, batch_size=64)


@pytest.mark.parametrize("moment", ["step=30", "checkpoint=2"])
def test_offline_run_killed_synced_then_resumed_continues_the_server_run(moment, server_uri, tmp_path):
    """Killed in epoch 2, or while epoch 2's checkpoint is being saved: epoch 1's unsent
    checkpoint must still be there (a newer one may replace it only once it is whole)."""
    env = subprocess_env(server_uri, MLEXP_OFFLINE="1")
    experiment = f"offline-resume-{moment.split('=')[0]}"  # the server is shared by the module's tests
    killed = run_mlexp(["train", *TINY, "--epochs", "2", "--batch-size", "64", "--experiment", experiment],
                       dict(env, MLEXP_FAULT=moment), tmp_path)
    assert killed.returncode == -signal.SIGKILL
    synced = run_mlexp(["sync", "--all", "--to", server_uri], subprocess_env(server_uri), tmp_path)
    assert synced.returncode == 0 and ", offline)" in synced.stdout, synced.stdout
    local_id = synced.stdout.split(", offline)")[0].rsplit("(", 1)[1]
    resumed = run_mlexp(["train", "--resume", local_id], subprocess_env(server_uri), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1 " in resumed.stdout, resumed.stdout
    client = MlflowClient(server_uri)
    run = only_run(client, experiment)
    assert run.data.tags["mlexp.local_id"] == local_id
    assert_complete(client, run.info.run_id, epochs=2, batch_size=64)


def test_killed_run_shows_lost_then_reaped_then_resumed(server_uri, tmp_path):
    period = 2.0
    env = subprocess_env(server_uri, MLEXP_HEARTBEAT_S=str(period))
    proc, seen = train_past_epoch_1("lost", 3, 8, env, tmp_path)
    client = MlflowClient(server_uri)
    run_id = only_run(client, "lost").info.run_id
    assert "mlexp.heartbeat" in client.get_run(run_id).data.tags
    assert monitor.lost_runs(server_uri, ["lost"]) == []  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = time.time()
    while not monitor.lost_runs(server_uri, ["lost"]):
        assert time.time() - killed < 2 * period, "not shown lost within two heartbeat periods"
        time.sleep(0.1)
    assert "lost (last beat" in monitor.progress(server_uri, ["lost"])

    reaped = run_mlexp(["reap", "--experiment", "lost"], env, tmp_path)
    assert reaped.returncode == 0 and f"({run_id}) FAILED" in reaped.stdout
    assert f"its process (pid {proc.pid}) on this machine is gone" in reaped.stdout, reaped.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "no heartbeat since" in run.data.tags["mlexp.error"]

    resumed = run_mlexp(["train", "--resume", run_id], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete(client, run_id, epochs=3, batch_size=8)  # and mlexp.error is gone


def test_resume_refusals_leave_the_run_as_it_was(server_uri, tmp_path):
    env = subprocess_env(server_uri)
    done = run_mlexp(["train", *TINY, "--epochs", "1", "--batch-size", "64", "--experiment", "refusals"],
                     env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(server_uri)
    finished = only_run(client, "refusals").info.run_id
    again = run_mlexp(["train", "--resume", finished], env, tmp_path)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert "already FINISHED" in again.stderr and client.get_run(finished).info.status == "FINISHED"

    # A resume that fails before training (its data folder is gone) changes nothing.
    data = tmp_path / "images"
    write_tiny_folder(data)
    killed = run_mlexp(["train", "--backbone", "test_resnet", "--init", "scratch", "--data", str(data),
                        "--img-size", "16", "--epochs", "2", "--batch-size", "4", "--calibrate", "false",
                        "--experiment", "refusals-data"], dict(env, MLEXP_FAULT="step=3"), tmp_path)
    assert killed.returncode == -signal.SIGKILL
    run = only_run(client, "refusals-data")
    shutil.rmtree(data)
    failed = run_mlexp(["train", "--resume", run.info.run_id], env, tmp_path)
    assert failed.returncode == 2 and "does not exist" in failed.stderr
    after = client.get_run(run.info.run_id)
    assert after.info.status == run.info.status == "RUNNING" and after.data.tags == run.data.tags


def write_tiny_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(12):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")


def test_sigterm_during_an_outage_keeps_everything_for_sync(own_server, tmp_path):
    env = subprocess_env(own_server.uri)
    proc, seen = train_past_epoch_1("sigterm", 3, 16, env, tmp_path)
    client = MlflowClient(own_server.uri)
    run_id = only_run(client, "sigterm").info.run_id
    own_server.stop()
    read_until(proc, "epoch   2", seen)
    proc.send_signal(signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output[-3000:]
    assert f"run {run_id} (KILLED): the tracking server does not have everything yet" in output

    own_server.start()
    synced = run_mlexp(["sync", "--run", run_id], env, tmp_path)
    assert synced.returncode == 0, synced.stdout + synced.stderr[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["mlexp.error"] == "interrupted"
    logged = steps(client, run_id, "batch/loss")
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 2 * (1437 // 16)
    assert steps(client, run_id, "val/acc") == [1, 2]
    # The signal may land before or after epoch 2's checkpoint was written: whichever the
    # manifest names is whole on the server.
    manifest = json.loads(Path(client.download_artifacts(run_id, "checkpoints/last/manifest.json",
                                                         str(tmp_path))).read_text())
    assert manifest["epoch"] in (1, 2)
    assert {f"checkpoints/last/{manifest['folder']}/{name}" for name in manifest["files"]} <= artifact_paths(
        client, run_id)
    resumed = run_mlexp(["train", "--resume", run_id], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete(client, run_id, epochs=3, batch_size=16)
