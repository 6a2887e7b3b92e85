"""A tracked run end to end, through `mlflow run`, torchrun and resume."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from mlexp.config import TrainConfig, config_fields
from mlexp.training import hardware
from mlexp.training.recipes import preset_fields
from tests.faults import mlexp_process
from tests.helpers import (
    DIGITS_TRAIN_SIZE,
    ROOT,
    artifact_paths,
    contract_artifacts,
    run_mlexp,
    runs_of,
    steps,
    subprocess_env,
    torchrun_train,
    write_pretrained_weights,
)

EPOCH_METRICS = ["train/loss", "train/loss_total", "train/acc", "val/loss", "val/acc", "epoch/time_s", "epoch/lr"]


@pytest.mark.slow
def test_mlflow_run_train_against_a_live_server(server_uri, tmp_path):
    """`mlflow run . -e train` with the documented parameters: one FINISHED, fully logged run."""
    weights = tmp_path / "weights"
    write_pretrained_weights(weights, "resnet18", "resnet18")  # resnet18 = resnet18_pretrained
    env = subprocess_env(server_uri, MLEXP_WEIGHTS_DIR=str(weights))
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "--experiment-name", "e2e-mlflow-run", "-P", "backbone=resnet18", "-P", "data=digits",
         "-P", "epochs=3", "-P", "img_size=32"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(server_uri)
    [run] = runs_of(client, "e2e-mlflow-run")
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    for f in config_fields():  # every effective field, under its name or (changed by mlexp) effective.NAME
        assert f.name in params or f"effective.{f.name}" in params
    assert params["effective.backbone"] == "resnet18_pretrained" and params["effective.init"] == "pretrained"
    # effective.* twins: what mlexp resolved (the catalogue name, what `auto` became on this
    # machine), and the options a recipe may set, left empty ("not set")
    twins = {k.removeprefix("effective.") for k in params if k.startswith("effective.")}
    defaults = TrainConfig().to_params()
    assert twins == {"backbone", "init", *hardware.RESOLVED, *hardware.cuda_settings()} | {
        name for name in preset_fields() if defaults[name] != ""}
    assert params["effective.mixed_precision"] == hardware.device_precision("auto")  # "no" on a CPU
    assert params["effective.workers"] == "0"  # digits: in memory, nothing to decode
    assert params["lr"] in ("", "''") and params["effective.lr"] == "0.001"
    assert params["distributed_type"] == "NO" and params["num_processes"] == "1"
    assert params["weights_source"] == "weights-dir" and len(params["weights_sha256"]) == 64
    assert {tags["mlexp.backbone"], tags["mlexp.init"], tags["mlexp.strategy"], tags["mlexp.dataset"]} == {
        "resnet18", "pretrained", "full", "digits"}
    assert "mlexp.version" in tags and "mlexp.git_commit" in tags

    steps_per_epoch = DIGITS_TRAIN_SIZE // 32
    assert steps(client, run.info.run_id, "batch/loss") == list(range(1, 3 * steps_per_epoch + 1))
    for key in ("batch/lr", "batch/samples_per_s"):
        assert len(steps(client, run.info.run_id, key)) == 3 * steps_per_epoch
    for key in EPOCH_METRICS:
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key
    val_acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/acc")}
    assert val_acc[3] > 0.7
    assert metrics["best/val_acc"] == max(val_acc.values()) and "time/total_s" in metrics
    assert artifact_paths(client, run.info.run_id) == contract_artifacts(3, pretrained=True)  # older epochs pruned

    info_path = client.download_artifacts(run.info.run_id, "summary/training_info.json", str(tmp_path))
    info = json.loads(Path(info_path).read_text())
    assert info["backbone"] == "resnet18_pretrained" and len(info["epochs"]["train/loss"]) == 3
    assert info["params"]["total"] == info["params"]["trainable"] > 10_000_000


@pytest.mark.slow
def test_torchrun_two_processes_is_one_compiled_ddp_run_with_identical_weights(server_uri, tmp_path):
    """torchrun on CPU: real DDP over gloo (not two lone trainings), one run, ranks in sync; with
    --compile and channels_last on top of DDP (plain DDP: the gradual-unfreezing torchrun test)."""
    env = subprocess_env(server_uri)
    args = ["--backbone", "test_resnet", "--init", "scratch", "--data", "digits", "--epochs", "1", "--img-size", "16",
            "--batch-size", "32", "--compile", "true", "--channels-last", "true", "--experiment", "e2e-torchrun"]
    rank0, rank1 = torchrun_train(args, env, tmp_path)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    client = MlflowClient(server_uri)
    [run] = runs_of(client, "e2e-torchrun")
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed_type"] == "MULTI_CPU" and run.data.params["num_processes"] == "2"
    assert (run.data.params["compile"], run.data.params["effective.channels_last"]) == ("True", "true")
    # the checkpoint holds the plain model's weights (no DDP "module." or compile "_orig_mod." prefix), rank 0's
    saved = load_file(client.download_artifacts(run.info.run_id, "checkpoints/final/model.safetensors", str(tmp_path)))
    assert saved.keys() == rank0.keys()
    assert all(torch.equal(saved[key], rank0[key]) for key in saved)
    # each process sees half of each global batch: steps per epoch are halved
    assert steps(client, run.info.run_id, "batch/loss") == list(range(1, DIGITS_TRAIN_SIZE // 64 + 1))


@pytest.mark.slow
def test_accelerate_launch_multi_cpu_is_one_ddp_run(server_uri, tmp_path):
    env = subprocess_env(server_uri)
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "mlexp", "train", "--backbone", "test_resnet", "--init", "scratch", "--data", "synthetic", "--epochs", "1",
         "--img-size", "16", "--experiment", "e2e-accelerate"],
        env=dict(env, ACCELERATE_USE_CPU="true"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = runs_of(MlflowClient(server_uri), "e2e-accelerate")
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed_type"] == "MULTI_CPU" and run.data.params["num_processes"] == "2"


@pytest.mark.slow
def test_sigkill_in_second_epoch_then_resume_has_no_duplicate_and_no_gap(server_uri, tmp_path):
    env = subprocess_env(server_uri, MLEXP_CHECKPOINT_UPLOAD_S="0")  # epoch 1's checkpoint goes up at once
    # the tiny ResNet at batch 2: ~700 steps, ~6 s per epoch on one core, so the kill lands well inside epoch 2
    args = ["train", "--backbone", "test_resnet", "--init", "scratch", "--data", "digits", "--epochs", "3",
            "--img-size", "16", "--batch-size", "2", "--scratch-epochs-mult", "1", "--experiment", "e2e-resume"]
    proc = mlexp_process(args, env, tmp_path)
    client = MlflowClient(server_uri)
    try:
        for line in proc.stdout:  # "epoch   1 ..." is printed once epoch 1 is evaluated and logged
            if line.startswith("epoch   1"):
                break
        run_id = runs_of(client, "e2e-resume")[0].info.run_id
        deadline = time.time() + 60
        while "checkpoints/last/manifest.json" not in artifact_paths(client, run_id):
            assert time.time() < deadline, "epoch 1 checkpoint never arrived"
            time.sleep(0.1)
        time.sleep(1.0)  # well inside epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert steps(client, run_id, "val/acc") == [1], "the kill did not land in epoch 2"
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so; resume must finish it

    resumed = run_mlexp(["train", "--resume", run_id], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming run" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps_per_epoch = DIGITS_TRAIN_SIZE // 2
    assert steps(client, run_id, "batch/loss") == list(range(1, 3 * steps_per_epoch + 1))
    for key in EPOCH_METRICS:
        assert steps(client, run_id, key) == [1, 2, 3], key
    assert len(runs_of(client, "e2e-resume")) == 1


def test_single_process_run_logs_everything_to_a_sqlite_store(sqlite_uri, tmp_path):
    """The in-process path (what `mlexp train` runs), small and fast: the contract's names."""
    from mlexp.config import TrainConfig
    from mlexp.training.run import run_training

    result = run_training(TrainConfig(backbone="resnet18_scratch", data="synthetic", epochs=2, img_size=16,
                                      batch_size=64, checkpoint_every=1, experiment="inproc"))
    client = MlflowClient(sqlite_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "resnet18_scratch" and run.data.params["init"] == "scratch"
    assert contract_artifacts(2) | {"checkpoints/epoch_001/model.safetensors",
                                    "checkpoints/epoch_002/model.safetensors"} == artifact_paths(client, result.run_id)
    # The best and final weights as logged models of the run, at their steps, on its three splits' datasets.
    models = {m.name: m for m in client.search_logged_models([run.info.experiment_id],
                                                             filter_string=f"source_run_id = '{result.run_id}'")}
    assert sorted(models) == ["best", "final"] and all(m.status == "READY" for m in models.values())
    assert {o.model_id: o.step for o in run.outputs.model_outputs} == {models["best"].model_id: result.best_epoch,
                                                                      models["final"].model_id: 2}
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["synthetic-train", "synthetic-val"]
    # one digest of the whole split, from the splits' own digests: what compare counts folds by
    from mlexp.data.digests import SplitDataset, split_digest

    logged_splits = [SplitDataset(d.tags[0].value, d.dataset.name, d.dataset.digest, "", 0, 0)
                     for d in sorted(run.inputs.dataset_inputs, key=lambda d: d.dataset.name)]
    assert run.data.tags["mlexp.split_digest"] == split_digest(logged_splits)
    import mlflow.pyfunc

    served = mlflow.pyfunc.load_model(f"models:/{models['final'].model_id}")
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    probabilities = served.predict(images)
    assert probabilities.shape == (3, 10) and list(probabilities.columns) == [str(c) for c in range(10)]
    batch_csv = client.download_artifacts(result.run_id, "metrics/batch_metrics.csv", str(tmp_path))
    header, *rows = Path(batch_csv).read_text().splitlines()
    assert header == "epoch,batch,step,batch/loss,batch/lr,batch/samples_per_s,timestamp"
    assert len(rows) == len(steps(client, result.run_id, "batch/loss"))
    # one record per epoch: the CSV's columns are the metric names, with MLflow's values
    epoch_csv = client.download_artifacts(result.run_id, "metrics/epoch_metrics.csv", str(tmp_path))
    with open(epoch_csv) as handle:
        epochs = list(csv.DictReader(handle))
    for name in EPOCH_METRICS:
        logged = {m.step: m.value for m in client.get_metric_history(result.run_id, name)}
        assert {int(row["epoch"]): float(row[name]) for row in epochs} == pytest.approx(logged), name
    assert all(m.value > 0 for m in client.get_metric_history(result.run_id, "batch/samples_per_s"))
    lrs = [m.value for m in sorted(client.get_metric_history(result.run_id, "batch/lr"), key=lambda m: m.step)]
    assert lrs[0] > lrs[-1] > 0  # the cosine schedule moved, step by step
    final = load_file(client.download_artifacts(result.run_id, "checkpoints/final/model.safetensors", str(tmp_path)))
    for key, value in result.model.state_dict().items():
        assert torch.equal(final[key], value), key
