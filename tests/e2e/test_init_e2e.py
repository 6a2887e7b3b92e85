"""Pretrained vs scratch runs, weight sources, effective params."""

from __future__ import annotations

import hashlib

import pytest
import torch
from mlflow import MlflowClient

from mlexp.commands.cli import main
from mlexp.config import TrainConfig
from mlexp.training.checkpoints import load_weights
from mlexp.training.run import run_training
from tests.helpers import write_pretrained_weights

SMALL = dict(data="digits", img_size=16, batch_size=64, calibrate=False, experiment="init-e2e")


def test_pretrained_and_scratch_runs_log_effective_values_and_their_weights(sqlite_uri, tmp_path):
    # timm's tiny ResNet: a timm name with --init takes the catalogue's scratch rules, at a 60th of resnet50's cost
    weights = write_pretrained_weights(tmp_path / "w", "test_resnet", "test_resnet", seed=3)
    client = MlflowClient(sqlite_uri)
    common = dict(SMALL, epochs=2, lr=0.01, warmup_epochs=2.0, weight_decay=0.05)
    # linear probe: the backbone must come out exactly as loaded, so the final weights prove the load
    pretrained = run_training(TrainConfig(backbone="test_resnet", init="pretrained", weights=str(weights),
                                          strategy="linear", **common))
    scratch = run_training(TrainConfig(backbone="test_resnet", init="scratch", **common))

    p = client.get_run(pretrained.run_id).data
    s = client.get_run(scratch.run_id).data
    assert (p.params["lr"], p.params["epochs"], p.params["warmup_epochs"], p.params["weight_decay"]) == (
        "0.01", "2", "2.0", "0.05")
    assert (s.params["lr"], s.params["epochs"], s.params["warmup_epochs"], s.params["weight_decay"]) == (
        "0.015", "2", "3.0", "0.04")  # 1.5x, round(1.2 x 2) = 2, 1.5x, 0.8x
    assert (p.tags["mlexp.init"], s.tags["mlexp.init"]) == ("pretrained", "scratch")
    assert p.tags["mlexp.backbone"] == s.tags["mlexp.backbone"] == "test_resnet"
    assert p.params["weights_source"] == "file" and s.params["weights_source"] == "none"
    assert p.params["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    loaded, final = load_weights(weights), pretrained.model.state_dict()
    checked = 0
    for key, value in loaded.items():
        if not key.startswith("fc."):  # the 1000-class classifier was re-initialised for 10 classes
            assert torch.equal(final[key], value), key
            checked += 1
    assert checked == len(loaded) - 2 and final["fc.weight"].shape == (10, 96)

    # an earlier mlexp run's final weights, by MLflow URI
    uri = f"runs:/{scratch.run_id}/checkpoints/final/model.safetensors"
    reused = run_training(TrainConfig(backbone="test_resnet", init="pretrained", weights=uri, strategy="linear",
                                      **dict(common, epochs=1)))
    r = client.get_run(reused.run_id).data
    assert r.params["weights_source"] == "mlflow-run" and r.params["weights"] == uri
    scratch_final = load_weights(client.download_artifacts(scratch.run_id, "checkpoints/final/model.safetensors",
                                                           str(tmp_path)))
    assert r.params["weights_sha256"] != p.params["weights_sha256"]
    for key in ("conv1.0.weight", "layer4.0.conv2.weight", "bn1.running_mean"):  # frozen by the linear probe
        assert torch.equal(reused.model.state_dict()[key], scratch_final[key]), key


def test_weights_folder_is_found_without_any_flag(sqlite_uri, tmp_path, monkeypatch):
    folder = tmp_path / "my-weights"
    weights = write_pretrained_weights(folder, "resnet18", "resnet18", seed=5)
    monkeypatch.setenv("MLEXP_WEIGHTS_DIR", str(folder))
    result = run_training(TrainConfig(backbone="resnet18", strategy="linear", epochs=1, **SMALL))
    params = MlflowClient(sqlite_uri).get_run(result.run_id).data.params
    assert params["backbone"] == "resnet18_pretrained" and params["weights_source"] == "weights-dir"
    assert params["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def invoke(args: list[str]) -> None:
    """Run the CLI in-process; success returns (or exits 0)."""
    try:
        main(args)
    except SystemExit as done:
        assert done.code in (0, None)


def test_backbones_command_lists_the_catalogue(capsys):
    invoke(["backbones"])
    out = capsys.readouterr().out
    names = [f"{arch}_{init}" for arch in ("resnet18", "resnet50", "vgg16", "deit_small", "swin_small")
             for init in ("pretrained", "scratch")] + ["vit_small", "vit_base"]
    for name in names:
        assert f"\n{name} " in out, name
    for alias in ("resnet18", "resnet50", "vgg16", "deit_small", "swin_small"):
        assert f"\n{alias} " in out, alias


def test_dry_run_shows_comparison_and_plan_and_creates_nothing(unmade_sqlite_uri, capsys, tmp_path):
    invoke(["train", "--backbone", "resnet50_scratch", "--epochs", "50", "--lr", "0.0001", "--warmup-epochs", "5",
            "--dry-run"])
    out = capsys.readouterr().out
    assert "0.0001" in out and "0.00015" in out and "60" in out  # pretrained vs scratch side by side
    assert "1." in out and "resnet50_scratch" in out
    assert not (tmp_path / "mlflow.db").exists()


def test_pretrain_exports_weights_that_the_next_pretrained_run_finds(sqlite_uri, tmp_path, monkeypatch):
    """The pretraining flow: pretrain from scratch, then downstream runs pick the weights up by themselves."""
    monkeypatch.setenv("MLEXP_WEIGHTS_DIR", str(tmp_path / "weights"))
    invoke(["pretrain", "--backbone", "resnet18", "--data", "synthetic", "--epochs", "1", "--img-size", "16",
            "--experiment", "pretrain"])
    exported = tmp_path / "weights" / "resnet18.safetensors"
    assert exported.is_file()
    client = MlflowClient(sqlite_uri)
    [run] = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    params = run.data.params
    assert (params["backbone"], params["recipe"], params["optimizer"], params["mixup"], params["cutmix"]) == (
        "resnet18_scratch", "pretrain", "sgd", "0.2", "1.0")
    assert float(params["lr"]) == pytest.approx(0.1 * 32 / 256)  # lr 0.1 per 256 images of global batch

    downstream = run_training(TrainConfig(backbone="resnet18", strategy="linear", epochs=1, **SMALL))
    d = client.get_run(downstream.run_id).data.params
    assert d["weights_source"] == "weights-dir"
    assert d["weights_sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
