"""The three strategies and the recipe, end to end on real data."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from mlexp.config import TrainConfig
from mlexp.training.checkpoints import load_weights
from mlexp.training.run import run_training
from tests.helpers import subprocess_env, torchrun_train, write_pretrained_weights

SMALL = dict(data="digits", img_size=16, batch_size=64, calibrate=False)


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# timm's own tiny ResNet (374k parameters): resnet18's stages and layer names, at a thirtieth of its cost
TINY_RESNET = "test_resnet"


@pytest.fixture
def tiny_resnet_weights(tmp_path):
    return write_pretrained_weights(tmp_path / "weights", TINY_RESNET, TINY_RESNET)


def test_linear_gradual_and_full_on_a_pretrained_resnet(sqlite_uri, tiny_resnet_weights):
    client = MlflowClient(sqlite_uri)
    common = dict(SMALL, backbone=TINY_RESNET, init="pretrained", weights=str(tiny_resnet_weights), epochs=3,
                  experiment="strategies")

    linear = run_training(TrainConfig(strategy="linear", lr=1e-2, **common))
    gradual = run_training(TrainConfig(strategy="gradual", gradual_patience=0, **common))
    full = run_training(TrainConfig(strategy="full", llrd_decay=0.8, **common))

    for result in (linear, gradual, full):
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlexp.strategy"] == run.data.params["strategy"] == result.effective.strategy
    total = int(client.get_run(full.run_id).data.metrics["model/params_total"])

    linear_trainable = history(client, linear.run_id, "train/trainable_params")
    assert len(set(linear_trainable)) == 1 and linear_trainable[0] == 96 * 10 + 10  # the head only (96 features)

    gradual_trainable = history(client, gradual.run_id, "train/trainable_params")
    assert gradual_trainable[0] < gradual_trainable[1] < gradual_trainable[2] == total
    assert history(client, gradual.run_id, "train/phase") == [0, 1, 2]

    assert history(client, full.run_id, "train/trainable_params") == [total] * 3
    assert client.get_run(full.run_id).data.params["llrd_decay"] == "0.8"

    # The linear probe's final backbone is the weights file, tensor for tensor (running stats included).
    loaded = load_weights(tiny_resnet_weights)
    final = linear.model.state_dict()
    for key, value in loaded.items():
        if not key.startswith("fc."):
            assert torch.equal(final[key], value), key


def test_recipe_options_finish_and_calibration_does_not_hurt(sqlite_uri):
    result = run_training(TrainConfig(
        backbone=TINY_RESNET, init="scratch", epochs=2, mixup=0.2, cutmix=1.0, label_smoothing=0.1,
        aa="rand-m9-mstd0.5", ema=True, reprob=0.25, clip_grad=1.0, experiment="recipe",
        **{**SMALL, "calibrate": True}))
    run = MlflowClient(sqlite_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("calib/temperature", "calib/nll_before", "calib/nll_after", "calib/ece_before", "calib/ece_after"):
        assert key in metrics, key
    assert metrics["calib/nll_after"] <= metrics["calib/nll_before"]
    assert metrics["calib/ece_after"] <= metrics["calib/ece_before"] + 1e-9
    params = run.data.params
    assert (params["mixup"], params["cutmix"], params["aa"], params["ema"]) == ("0.2", "1.0", "rand-m9-mstd0.5", "True")


@pytest.mark.slow
def test_gradual_unfreezing_under_torchrun_keeps_ranks_identical(server_uri, tmp_path):
    weights = write_pretrained_weights(tmp_path / "weights", TINY_RESNET, TINY_RESNET)
    args = ["--backbone", TINY_RESNET, "--init", "pretrained", "--weights", str(weights), "--strategy", "gradual",
            "--gradual-patience", "0", "--data", "digits", "--epochs", "3", "--img-size", "16",
            "--batch-size", "32", "--experiment", "gradual-ddp"]
    rank0, rank1 = torchrun_train(args, subprocess_env(server_uri), tmp_path)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # and the unfrozen layers really trained: layer1 moved away from the pretrained file
    loaded = load_weights(weights)
    assert not torch.equal(rank0["layer1.0.conv1.weight"], loaded["layer1.0.conv1.weight"])
    client = MlflowClient(server_uri)
    [run] = client.search_runs([client.get_experiment_by_name("gradual-ddp").experiment_id])
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/phase"),
                                    key=lambda m: m.step)] == [0, 1, 2]


def test_compiled_channels_last_run_saves_plain_weights_that_resume_and_reuse_can_load(sqlite_uri, tmp_path):
    result = run_training(TrainConfig(backbone=TINY_RESNET, init="scratch", epochs=1, compile=True, channels_last="true",
                                      grad_accum=2, experiment="compiled", data="synthetic", img_size=16,
                                      batch_size=32, calibrate=False))
    client = MlflowClient(sqlite_uri)
    expected = set(timm_keys(TINY_RESNET))
    for path in ("checkpoints/final/model.safetensors", "checkpoints/last/epoch_0001/model.safetensors"):
        saved = load_weights(client.download_artifacts(result.run_id, path, str(tmp_path / path.split("/")[1])))
        assert set(saved) == expected, path  # no "_orig_mod." or "module." prefixes


def timm_keys(name: str) -> list[str]:
    import timm

    return list(timm.create_model(name, num_classes=10).state_dict())
