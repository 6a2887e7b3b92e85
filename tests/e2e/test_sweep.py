"""Sweeps as nested runs, skip-finished, failures reported; then compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlexp.commands.cli import main
from tests.helpers import artifact_paths, run_mlexp, runs_of, subprocess_env, write_pretrained_weights

SMALL = ["--data", "digits", "--img-size", "16", "--batch-size", "64", "--epochs", "1", "--calibrate", "false"]


def sweep(args: list[str], expect: int = 0) -> None:
    try:
        main(["sweep", *SMALL, *args])
        code = 0
    except SystemExit as done:
        code = done.code or 0
    assert code == expect


def children(client: MlflowClient, experiment: str) -> list:
    return [r for r in runs_of(client, experiment) if "mlflow.parentRunId" in r.data.tags]


def test_unknown_backbone_in_the_grid_stops_before_anything_starts(sqlite_uri, tmp_path):
    done = run_mlexp(["sweep", "--backbones", "resnt18", *SMALL], subprocess_env(sqlite_uri), tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "resnet18" in done.stderr and "Traceback" not in done.stderr
    assert not runs_of(MlflowClient(sqlite_uri), "mlexp")


def test_dry_run_prints_the_plan_and_creates_nothing(unmade_sqlite_uri, capsys):
    sweep(["--backbones", "resnet18,vit_small", "--seeds", "1,2", "--folds", "3", "--dry-run"])
    out = capsys.readouterr().out
    assert "Training plan: 18 configuration(s)" in out  # resnet18 x 2 inits + vit_small (scratch only), x2 x3
    assert "resnet18_scratch full seed 2 fold 2" in out and "lr=0.0015" in out
    assert "Configuration comparison (pretrained vs scratch)" in out and "RESNET18:" in out and "VIT_SMALL:" in out
    assert not Path("mlflow.db").exists() or not runs_of(MlflowClient(unmade_sqlite_uri), "mlexp")


@pytest.mark.slow
def test_sweep_skip_finished_failures_then_compare_on_a_live_server(server_uri, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "weights"
    # timm's tiny ResNet and ViT: the two families' stages and layers, each under 400k parameters
    write_pretrained_weights(weights, "test_resnet", "test_resnet")
    write_pretrained_weights(weights, "test_vit", "test_vit")
    monkeypatch.setenv("MLEXP_WEIGHTS_DIR", str(weights))
    client = MlflowClient(server_uri)
    grid = ["--backbones", "test_resnet,test_vit", "--seeds", "1,2,3", "--test-split", "0.2", "--experiment",
            "sweep-e2e", "--parallel", "2"]

    sweep(grid)
    first = children(client, "sweep-e2e")
    assert len(first) == 12 and all(r.info.status == "FINISHED" for r in first)
    assert all(0 < r.data.metrics["test/acc"] <= 1 and r.data.metrics["test/epoch"] == 1 for r in first)
    assert all({"test/balanced_acc", "test/macro_f1", "test/top5", "val/macro_f1"} <= set(r.data.metrics) for r in first)
    assert {f"evaluation/{split}/{name}" for split in ("test", "val") for name in
            ("per_class.csv", "confusion_matrix.csv", "confusion_matrix.png")} <= artifact_paths(client, first[0].info.run_id)
    assert {(r.data.tags["mlexp.backbone"], r.data.tags["mlexp.init"]) for r in first} == {
        ("test_resnet", "pretrained"), ("test_resnet", "scratch"), ("test_vit", "pretrained"), ("test_vit", "scratch")}
    for child in first:  # the scratch multipliers are applied exactly once
        expected_lr = "0.0015" if child.data.tags["mlexp.init"] == "scratch" else "0.001"
        assert child.data.params["lr"] == expected_lr
    [parent] = [r for r in runs_of(client, "sweep-e2e") if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["sweep/finished"] == 12
    assert parent.info.run_name == "sweep test_resnet+test_vit (12 runs)"
    assert {key: parent.data.params[key] for key in ("sweep.backbones", "sweep.inits", "sweep.seeds", "sweep.size")} \
        == {"sweep.backbones": "test_resnet,test_vit", "sweep.inits": "pretrained,scratch", "sweep.seeds": "1,2,3",
            "sweep.size": "12 runs"}
    assert {r.info.run_name for r in first} >= {"test_resnet_scratch-full-s1", "test_vit_pretrained-full-s2"}
    assert {"summary/sweep_summary.json", "summary/sweep_summary.txt"} <= artifact_paths(client, parent.info.run_id)

    sweep(grid)  # the same sweep again: everything finished before, nothing is trained and no run is made
    assert len(runs_of(client, "sweep-e2e")) == 13

    # resnet50 has no pretrained weights here: its configuration FAILS, the other trains, exit status 1
    sweep(["--backbones", "test_resnet", "resnet50", "--pretrained-only", "--seeds", "7", "--experiment", "sweep-fail"],
          expect=1)
    failing = children(client, "sweep-fail")
    assert sorted(r.info.status for r in failing) == ["FAILED", "FINISHED"]
    [failed] = [r for r in failing if r.info.status == "FAILED"]
    assert "resnet50" in failed.data.tags["mlexp.error"]
    [parent] = [r for r in runs_of(client, "sweep-fail") if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    # every configuration failed: the parent is FAILED too
    sweep(["--backbones", "resnet50", "--pretrained-only", "--experiment", "sweep-all-fail"], expect=1)
    statuses = {("child" if "mlflow.parentRunId" in r.data.tags else "parent"): r.info.status
                for r in runs_of(client, "sweep-all-fail")}
    assert statuses == {"child": "FAILED", "parent": "FAILED"}

    # compare with the feature comparison against the same live server (in this process: the
    # entry points' own test runs compare through `mlflow run`, and MLproject is the CLI's options)
    capsys.readouterr()
    try:
        main(["compare", "--experiment", "sweep-e2e", "--out", str(tmp_path / "cmp"), "--features", "--tracking-uri",
              server_uri, "--compare-experiment", "compare-e2e"])
    except SystemExit as done:
        assert not done.code
    printed = capsys.readouterr().out
    [compare_run] = runs_of(client, "compare-e2e")
    assert compare_run.info.status == "FINISHED"
    files = artifact_paths(client, compare_run.info.run_id)
    logged = ["report.md", "comparisons.csv", "groups.csv", "groups.md", "compare.json", "pairs.csv",
              "val_acc_curves.png", "val_loss_curves.png", "pretrain_gain_curves.png", "best_acc_bar.png",
              "time_bar.png"]
    logged += [f"features/{arch}_{name}" for arch in ("test_resnet", "test_vit")
               for name in ("cka.png", "cka.csv", "cka_by_layer.csv")]
    for name in logged:
        assert f"compare/{name}" in files, name
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["metric"] == "test/acc"  # the runs have a test split
    groups = report["groups"]
    assert len(groups) == 4 and all(group["runs"] == 3 and group["metric_n"] == 3 for group in groups)
    # paired pretrained-minus-scratch rows, matched on seed (and fold), for both backbones; and their interaction
    assert {pair["backbone"] for pair in report["pairs"]} == {"test_resnet", "test_vit"}
    rows = report["comparisons"]
    gains = {row["backbone"]: row for row in rows if row["kind"] == "init"}
    assert set(gains) == {"test_resnet", "test_vit", "all backbones"}
    assert [gains[arch]["n"] for arch in ("test_resnet", "test_vit", "all backbones")] == [3, 3, 6]
    assert [row["kind"] for row in rows].count("interaction") == 1
    assert all(row["p_holm"] >= row["p_value"] > 0 for row in rows if row["n"])
    answers = (tmp_path / "cmp" / "report.md").read_text()
    for number in range(1, 8):
        assert f"## {number}. " in answers
    assert "n = 3 pairs" in answers and "linear CKA between pretrained and scratch" in answers
    features = {row["backbone"]: row for row in report["features"]}
    assert features["test_resnet"]["layers"] == ["act1", "layer1", "layer2", "layer3", "layer4", "pre_logits"]
    assert len(features["test_vit"]["layers"]) == 7 and not features["test_vit"]["problem"]  # 6 blocks + pre_logits
    for row in features.values():
        assert all(-0.2 < value <= 1.0 + 1e-9 for value in row["same_layer_cka"])
        assert set(row["to_init"]) == {"pretrained", "scratch"}  # the weights file, and the seed's init
    assert "test_resnet" in printed and "test_vit" in printed and "report.md" in printed  # the terminal table
