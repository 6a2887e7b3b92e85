"""compare against real MLflow stores: numbers checked against hand computations."""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy import stats

import mlexp.query
from mlexp.compare import compare, format_table, run_compare
from mlexp.errors import MlexpError
from mlexp.query import _RestSource
from tests.run_factory import experiment_id, log_run

T_975_DF2 = 4.302653  # t quantile for a two-sided 95% interval with 2 degrees of freedom (tables)
FILES = ["groups.csv", "groups.md", "compare.json", "pairs.csv", "runs.csv", "val_acc_curves.png",
         "val_loss_curves.png", "best_acc_bar.png", "time_bar.png"]


def populate_pairs(client: MlflowClient, experiment: str) -> None:
    """resnet18 pretrained vs scratch, full fine-tuning, seeds 1-3 paired (differences .3, .2, .25)."""
    for seed, val, train, epoch_time in ((1, [0.5, 0.7, 0.8], [0.55, 0.8, 0.9], 10.0),
                                         (2, [0.6, 0.8, 0.7], [0.6, 0.85, 0.95], 11.0),
                                         (3, [0.4, 0.6, 0.9], [0.5, 0.7, 0.92], 12.0)):
        log_run(client, experiment, seed=seed, val_acc=val, train_acc=train, epoch_time=epoch_time)
    for seed, val in ((1, [0.2, 0.4, 0.5]), (2, [0.3, 0.5, 0.6]), (3, [0.3, 0.6, 0.65])):
        log_run(client, experiment, init="scratch", seed=seed, val_acc=val, epoch_time=20.0)


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two experiments: the pairs above, an unpaired scratch run, a linear probe, another backbone,
    and runs that must stay out of the statistics (running, failed, a parent run without metrics).
    Built once; each test gets a copy of the SQLite file."""
    path = tmp_path_factory.mktemp("compare-store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    populate_pairs(client, "cmp-a")
    log_run(client, "cmp-a", init="scratch", seed=4, val_acc=[0.1, 0.2, 0.3])
    log_run(client, "cmp-a", strategy="linear", val_acc=[0.4, 0.45], trainable=50)
    log_run(client, "cmp-b", backbone="vit_small", init="scratch",
            val_acc=[0.2, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6])
    running = log_run(client, "cmp-b", seed=5, val_acc=[0.3], status="RUNNING", epochs=3)
    failed = log_run(client, "cmp-b", init="scratch", seed=6, val_acc=[0.1], status="FAILED")
    parent = client.create_run(experiment_id(client, "cmp-b"), run_name="sweep-parent").info.run_id
    client.set_terminated(parent)
    return path, {"running": running, "failed": failed, "parent": parent}


@pytest.fixture
def store(sqlite_uri, prebuilt):
    path, special = prebuilt
    shutil.copyfile(path, sqlite_uri.removeprefix("sqlite:///"))
    return MlflowClient(sqlite_uri), special


def group(result, **keys) -> dict:
    rows = result.groups
    for name, value in keys.items():
        rows = rows[rows[name] == value]
    assert len(rows) == 1, rows
    return rows.iloc[0].to_dict()


def test_groups_pairs_excluded_and_files(store, tmp_path):
    client, special = store
    result = compare(client, ["cmp-a", "cmp-b"], out_dir=tmp_path / "out")

    assert len(result.runs) == 9
    assert result.groups["runs"].tolist() == [3, 1, 4, 1]  # sorted by backbone, init, strategy
    pre = group(result, backbone="resnet18", init="pretrained", strategy="full")
    assert pre["best_val_acc_mean"] == pytest.approx((0.8 + 0.8 + 0.9) / 3)
    assert pre["best_val_acc_std"] == pytest.approx(0.0577350, abs=1e-6)  # sd of .8, .8, .9
    assert pre["final_val_acc_mean"] == pytest.approx(0.8)
    assert pre["final_val_acc_std"] == pytest.approx(0.1)
    assert pre["final_train_acc_mean"] == pytest.approx((0.9 + 0.95 + 0.92) / 3)
    assert pre["overfit_gap_mean"] == pytest.approx((0.1 + 0.25 + 0.02) / 3)
    assert pre["total_time_s_mean"] == pytest.approx(33.0)
    assert pre["epoch_time_s_mean"] == pytest.approx(11.0)
    assert pre["trainable_params_mean"] == 1000
    # 95% of the group's best (.9) is .855: only seed 3 gets there, at epoch 3
    assert pre["epochs_to_95_mean"] == 3.0
    assert pre["gain_5_mean"] == pytest.approx((0.3 + 0.1 + 0.5) / 3)  # epoch 3 (last) minus epoch 1
    scratch = group(result, backbone="resnet18", init="scratch", strategy="full")
    assert scratch["best_val_acc_mean"] == pytest.approx((0.5 + 0.6 + 0.65 + 0.3) / 4)
    assert math.isnan(group(result, strategy="linear")["best_val_acc_std"])  # one run: no std
    assert group(result, backbone="vit_small")["gain_5_mean"] == pytest.approx(0.5 - 0.2)  # epoch 5 - epoch 1
    assert result.curves["val/acc"].loc[1, "resnet18/pretrained/full"] == pytest.approx(0.5)

    # paired on seed (3 pairs); the unpaired seed-4 scratch run and vit_small (no pretrained) drop out
    assert len(result.pairs) == 3
    (summary,) = result.pair_summary.to_dict("records")
    assert (summary["backbone"], summary["strategy"], summary["n_pairs"]) == ("resnet18", "full", 3)
    assert summary["mean_diff"] == pytest.approx(0.25)
    half = T_975_DF2 * 0.05 / math.sqrt(3)
    assert summary["ci95_low"] == pytest.approx(0.25 - half, abs=1e-6)
    assert summary["ci95_high"] == pytest.approx(0.25 + half, abs=1e-6)
    assert summary["p_value"] == pytest.approx(stats.ttest_rel([0.8, 0.8, 0.9], [0.5, 0.6, 0.65]).pvalue)
    assert summary["time_diff_s"] == pytest.approx(33.0 - 60.0)

    excluded = {row["run_id"]: row for row in result.excluded}
    assert set(excluded) == set(special.values())
    assert excluded[special["running"]]["status"] == "RUNNING"
    assert excluded[special["failed"]]["status"] == "FAILED"
    assert "no val/acc" in excluded[special["parent"]]["reason"]
    assert not set(excluded) & set(result.runs["run_id"])

    out = tmp_path / "out"
    assert all((out / name).is_file() for name in FILES)
    assert pd.read_csv(out / "groups.csv")["runs"].sum() == 9
    assert len(pd.read_csv(out / "pairs.csv")) == 3
    saved = json.loads((out / "compare.json").read_text())
    assert saved["pair_summary"][0]["mean_diff"] == pytest.approx(0.25)
    assert {row["status"] for row in saved["excluded"]} == {"RUNNING", "FAILED", "FINISHED"}
    assert len(saved["groups"]) == 4
    for name in FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_table(result)
    assert "+25.0" in text and f"[{100 * (0.25 - half):+.1f}, {100 * (0.25 + half):+.1f}]" in text
    assert "1 failed, 1 finished, 1 running" in text
    assert "| backbone | init | strategy | runs |" in (out / "groups.md").read_text()


def test_group_by_param_tag_and_experiment_and_filter(store, tmp_path):
    client, _ = store
    by_strategy = compare(client, ["cmp-a", "cmp-b"], group_by=["strategy"], out_dir=tmp_path / "a", plots=False)
    assert dict(zip(by_strategy.groups["strategy"], by_strategy.groups["runs"])) == {"full": 8, "linear": 1}
    by_param = compare(client, ["cmp-a"], group_by=["lr", "tags.mlexp.dataset"], out_dir=tmp_path / "b",
                       plots=False)
    assert by_param.groups[["lr", "tags.mlexp.dataset", "runs"]].values.tolist() == [["0.001", "digits", 8]]
    by_experiment = compare(client, ["cmp-a", "cmp-b"], group_by=["experiment"], out_dir=tmp_path / "c",
                            plots=False)
    assert dict(zip(by_experiment.groups["experiment"], by_experiment.groups["runs"])) == {"cmp-a": 8, "cmp-b": 1}
    scratch = compare(client, ["cmp-a", "cmp-b"], "tags.`mlexp.init` = 'scratch'", out_dir=tmp_path / "d")
    assert len(scratch.runs) == 5 and set(scratch.runs["init"]) == {"scratch"}
    assert [row["status"] for row in scratch.excluded] == ["FAILED"]
    assert scratch.pair_summary.empty


def test_user_errors_are_one_line(store, tmp_path):
    client, _ = store
    with pytest.raises(MlexpError, match="no MLflow experiment 'nope'.*cmp-a"):
        compare(client, ["nope"], out_dir=tmp_path)
    with pytest.raises(MlexpError, match="rejected the filter") as bad_filter:
        compare(client, ["cmp-a"], "metrics.`val/acc` >>> 1", out_dir=tmp_path)
    assert "\n" not in str(bad_filter.value)
    with pytest.raises(MlexpError, match="--group-by 'colour'"):
        compare(client, ["cmp-a"], group_by=["colour"], out_dir=tmp_path)
    with pytest.raises(MlexpError, match="at least one experiment"):
        compare(client, [], out_dir=tmp_path)


def test_empty_selection_writes_tables_without_plots(store, tmp_path):
    client, _ = store
    result = compare(client, ["cmp-a"], "tags.`mlexp.backbone` = 'none'", out_dir=tmp_path / "out")
    assert result.groups.empty and result.pair_summary.empty
    assert (tmp_path / "out" / "compare.json").is_file() and not (tmp_path / "out" / "best_acc_bar.png").exists()
    assert "No finished training runs match" in format_table(result)


def test_live_server_rest_path_and_compare_run(server_uri, tmp_path, monkeypatch):
    client = MlflowClient(server_uri)
    experiment = f"cmp-live-{uuid.uuid4().hex[:6]}"
    populate_pairs(client, experiment)
    result = run_compare(server_uri, [experiment], out_dir=tmp_path / "out")
    (summary,) = result.pair_summary.to_dict("records")
    assert (summary["n_pairs"], summary["mean_diff"]) == (3, pytest.approx(0.25))
    assert group(result, init="pretrained")["epoch_time_s_mean"] == pytest.approx(11.0)

    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert client.get_experiment(logged.info.experiment_id).name == "mlexp-compare"
    assert logged.data.metrics["pretrain_gain/resnet18"] == pytest.approx(0.25)
    assert logged.data.params["compare.experiments"] == experiment
    assert {f.path for f in client.list_artifacts(result.run_id, "compare")} >= {f"compare/{n}" for n in FILES}

    # Under `mlflow run` the project's run is used (and left for `mlflow run` to end).
    project_run = client.create_run(experiment_id(client, "cmp-project")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    again = run_compare(server_uri, [experiment], out_dir=tmp_path / "again")
    assert again.run_id == project_run and client.get_run(project_run).info.status == "RUNNING"
    monkeypatch.delenv("MLFLOW_RUN_ID")

    # The fallbacks return the same histories: replies cut at the point limit are split, and
    # servers without the bulk endpoint are asked through the public bulk-interval endpoint.
    monkeypatch.setattr(mlexp.query, "BULK_MAX_POINTS", 4)
    split = compare(client, [experiment], out_dir=tmp_path / "split", plots=False)
    pd.testing.assert_frame_equal(split.curves["val/acc"], result.curves["val/acc"])
    source = _RestSource(client)
    source.bulk_available = False
    run_ids = result.runs["run_id"].tolist()
    interval = source.histories(run_ids, "val/acc")
    assert {run_id: sorted(points) for run_id, points in interval.items()} == {
        run_id: sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/acc"))
        for run_id in run_ids}


def test_unreachable_server_is_a_user_error(tmp_path):
    with pytest.raises(MlexpError, match="cannot reach"):
        run_compare("http://127.0.0.1:9", ["x"], out_dir=tmp_path)
