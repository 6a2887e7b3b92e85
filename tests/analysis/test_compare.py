"""compare against real MLflow stores: numbers checked against hand computations."""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.colors import to_hex
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy import stats

from mlexp.analysis.compare import compare, format_table, run_compare
from mlexp.analysis.plots import best_acc_figure, curves_figure, group_styles
from mlexp.analysis.tables import (
    COLUMN_NOTES,
    COMPARISON_NOTES,
    KIND_TITLES,
    METRIC_NOTES,
    comparison_rows,
    group_rows,
    metric_rows,
    render_summary,
)
from mlexp.errors import MlexpError
from mlexp.sweep.summary import best_per_backbone
from tests.run_factory import experiment_id, log_run

FILES = ["groups.csv", "groups.md", "compare.json", "pairs.csv", "comparisons.csv", "runs.csv", "report.md",
         "val_acc_curves.png", "val_loss_curves.png", "pretrain_gain_curves.png", "best_acc_bar.png", "time_bar.png"]
TIME_CELL = re.compile(r"^(-|[+-]?\d+\.\d)$")  # a number only: the unit is in the header


def populate_pairs(client: MlflowClient, experiment: str) -> None:
    """resnet18 pretrained vs scratch, full fine-tuning, seeds 1-3 paired (differences .3, .2, .25)."""
    for seed, val, train, epoch_time in ((1, [0.5, 0.7, 0.8], [0.55, 0.8, 0.9], 10.0),
                                         (2, [0.6, 0.8, 0.7], [0.6, 0.85, 0.95], 11.0),
                                         (3, [0.4, 0.6, 0.9], [0.5, 0.7, 0.92], 12.0)):
        log_run(client, experiment, seed=seed, val_acc=val, train_acc=train, epoch_time=epoch_time)
    for seed, val in ((1, [0.2, 0.4, 0.5]), (2, [0.3, 0.5, 0.6]), (3, [0.3, 0.6, 0.65])):
        log_run(client, experiment, init="scratch", seed=seed, val_acc=val, epoch_time=20.0)


def populate_others(client: MlflowClient, experiment: str) -> dict[str, str]:
    """A sweep (parent, a trained child, a child that failed before training), training runs that
    did not count (running, failed, finished with no epoch), and runs that are not training runs."""
    eid = experiment_id(client, experiment)
    parent = client.create_run(eid, run_name="sweep", tags={"mlexp.sweep": "true"}).info.run_id
    child = {"mlflow.parentRunId": parent, "mlexp.sweep_id": parent}
    log_run(client, experiment, backbone="vit_small", init="scratch", tags=child,
            val_acc=[0.2, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6])
    untrained = client.create_run(eid, run_name="no_such_net-full-s1", tags=child).info.run_id
    client.set_terminated(untrained, "FAILED")
    client.set_terminated(parent)
    earlier = client.create_run(eid, run_name="compare cmp-b", tags={"mlexp.kind": "compare"}).info.run_id
    client.log_batch(earlier, metrics=[Metric("pretrain_gain/resnet18", 0.2, 0, 0), Metric("runs", 8, 0, 0)])
    client.set_terminated(earlier)
    client.set_terminated(client.create_run(eid, run_name="notebook").info.run_id)
    return {"running": log_run(client, experiment, seed=5, val_acc=[0.3], status="RUNNING", epochs=3),
            "failed": log_run(client, experiment, init="scratch", seed=6, val_acc=[0.1], status="FAILED"),
            "untrained": untrained, "no_epoch": log_run(client, experiment, seed=7, val_acc=[], epochs=3)}


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two experiments: the pairs above, an unpaired scratch run, a linear probe, another backbone,
    and the runs of populate_others. Built once; each test gets a copy of the SQLite file."""
    path = tmp_path_factory.mktemp("compare-store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    populate_pairs(client, "cmp-a")
    log_run(client, "cmp-a", init="scratch", seed=4, val_acc=[0.1, 0.2, 0.3])
    log_run(client, "cmp-a", strategy="linear", val_acc=[0.4, 0.45], trainable=50)
    return path, populate_others(client, "cmp-b")


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


def test_groups_pairs_and_files(store, tmp_path):
    client, _ = store
    result = compare(client, ["cmp-a", "cmp-b"], out_dir=tmp_path / "out")

    assert len(result.runs) == 9
    assert result.groups["runs"].tolist() == [3, 1, 4, 1]  # sorted by backbone, strategy
    pre = group(result, backbone="resnet18_pretrained", strategy="full")
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
    scratch = group(result, backbone="resnet18_scratch", strategy="full")
    assert scratch["best_val_acc_mean"] == pytest.approx((0.5 + 0.6 + 0.65 + 0.3) / 4)
    assert math.isnan(group(result, strategy="linear")["best_val_acc_std"])  # one run: no std
    assert group(result, backbone="vit_small")["gain_5_mean"] == pytest.approx(0.5 - 0.2)  # epoch 5 - epoch 1
    curve = result.curves["val/acc"].set_index(["group", "epoch"])
    first = curve.loc[("resnet18_pretrained/full", 1)]  # seeds at epoch 1: .5, .6, .4
    assert (first["n"], first["mean"]) == (3, pytest.approx(0.5))
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # the band: a t interval over the 3 runs
    assert (first["low"], first["high"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    # the compared metric per group: n, mean, interval, median
    assert (pre["metric_n"], pre["metric_mean"], pre["metric_median"]) == (3, pytest.approx(0.8333333), 0.8)
    assert math.isnan(pre["metric_ci_low"])  # 3 runs: no interval (a bootstrap-t interval needs 4)

    # paired on seed (3 pairs); the unpaired seed-4 scratch run and vit_small (no pretrained) drop out
    assert len(result.pairs) == 3 and set(result.pairs["backbone"]) == {"resnet18"}
    rows = {row["kind"]: row for row in result.comparisons.to_dict("records")}
    assert set(rows) == {"init", "time", "convergence", "strategy"}  # strategy: full vs linear, seed 1 only
    gain = rows["init"]
    assert (gain["backbone"], gain["strategy"], gain["n"]) == ("resnet18", "full", 3)
    assert gain["mean_diff"] == pytest.approx(0.25)  # differences .3, .2, .25
    assert math.isnan(gain["ci_low"]) and "n = 3: an interval needs at least 4 (run 1 more)" in gain["note"]
    assert gain["p_value"] == pytest.approx(2 / 8)  # all 3 positive: 2 of the 8 sign patterns are as extreme
    # Holm over the report's four p-values (init .25, time .25, convergence .5, strategy 1): 4 x .25
    assert [rows[k]["p_value"] for k in ("time", "convergence", "strategy")] == [0.25, 0.5, 1.0]
    assert gain["p_holm"] == 1.0 and rows["convergence"]["p_holm"] == 1.0
    assert (gain["win_prob"], gain["win_low"], gain["win_high"]) == (1.0, pytest.approx(0.4385, abs=1e-4), 1.0)
    assert "n = 3 < 5" in gain["note"]
    assert rows["time"]["mean_diff"] == pytest.approx(33.0 - 60.0)

    out = tmp_path / "out"
    assert all((out / name).is_file() for name in FILES)
    assert pd.read_csv(out / "groups.csv")["runs"].sum() == 9
    assert len(pd.read_csv(out / "pairs.csv")) == 3
    saved = json.loads((out / "compare.json").read_text())
    assert saved["comparisons"][0]["mean_diff"] == pytest.approx(0.25) and saved["metric"] == "best/val_acc"
    assert len(saved["groups"]) == 4
    assert saved["mlflow_reads"] == {"taken": {"public-search": 1, "store-history-bulk": 2}, "fallbacks": []}
    for name in FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_table(result)
    assert "+25.0" in text and "n too small" in text
    assert "0.000" not in text  # no p-value of zero
    assert "| backbone | strategy | runs |" in (out / "groups.md").read_text()


def test_only_training_runs_that_could_not_count_are_listed(store, tmp_path):
    client, special = store
    result = compare(client, ["cmp-a", "cmp-b"], out_dir=tmp_path / "out", plots=False)
    excluded = {row["run_id"]: row for row in result.excluded}
    assert set(excluded) == set(special.values())  # not the sweep parent, the compare run, the notebook run
    assert excluded[special["running"]]["status"] == "RUNNING"
    assert excluded[special["failed"]]["status"] == excluded[special["untrained"]]["status"] == "FAILED"
    assert "without a val/acc" in excluded[special["no_epoch"]]["reason"]
    assert not set(excluded) & set(result.runs["run_id"])
    assert result.ignored == {"sweep parent": 1, "compare run": 1, "no training tags, params or metrics": 1}
    text = format_table(result)
    assert "Training runs not in the statistics (2 failed, 1 finished, 1 running)" in text
    section = text.split("Training runs not in the statistics")[1]
    assert "sweep" not in section.split("Not training runs")[0] and "notebook" not in text
    assert "Not training runs, left out: 1 compare run, 1 no training tags, params or metrics, 1 sweep parent." in text
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert {row["run_id"] for row in saved["excluded"]} == set(special.values())
    assert saved["not_training_runs"] == result.ignored


def test_backbones_are_named_as_in_the_sweep_summary(store, tmp_path):
    client, _ = store
    result = compare(client, ["cmp-a", "cmp-b"], out_dir=tmp_path / "out", plots=False)
    finished = [run.info.run_id for name in ("cmp-a", "cmp-b")
                for run in client.search_runs([experiment_id(client, name)], "attributes.status = 'FINISHED'")]
    sweep_names = {row["backbone"] for row in best_per_backbone(client, finished)}
    assert set(result.groups["backbone"]) == sweep_names == {"resnet18_pretrained", "resnet18_scratch", "vit_small"}
    by_arch = compare(client, ["cmp-a", "cmp-b"], group_by=["arch", "init"], out_dir=tmp_path / "a", plots=False)
    assert by_arch.groups[["arch", "init", "runs"]].values.tolist() == [
        ["resnet18", "pretrained", 4], ["resnet18", "scratch", 4], ["vit_small", "scratch", 1]]


def test_every_column_is_defined_under_its_table(store, tmp_path):
    client, _ = store
    result = compare(client, ["cmp-a", "cmp-b"], out_dir=tmp_path / "out", plots=False)
    for markdown in (False, True):
        text = render_summary(result, markdown)
        tables = [(group_rows(result), COLUMN_NOTES), (metric_rows(result), METRIC_NOTES)]
        tables += [(comparison_rows(result, kind), COMPARISON_NOTES) for kind in KIND_TITLES
                   if comparison_rows(result, kind)]
        assert len(tables) == 6  # groups, metric, init, strategy, time, convergence
        for rows, notes in tables:
            for column in list(rows[0]) + (["±"] if notes is COLUMN_NOTES else []):
                if notes is METRIC_NOTES and column in result.group_by:
                    continue  # the groups are defined under the first table
                note = notes.get(column, notes.get(column.split(" (")[0]))  # each has one (a unit aside)
                line = rf"^- \*\*{re.escape(column)}\*\*: " if markdown else rf"^  {re.escape(column)} +"
                assert re.search(line + re.escape(note) + "$", text, re.M), (column, markdown)
    assert {"gain@5 pp", "ep to 95%", "gap pp", "±", "trainable"} <= set(COLUMN_NOTES)
    assert {"p (Holm)", "95% CI", "diff", "P(A>B)"} <= set(COMPARISON_NOTES)
    assert (tmp_path / "out" / "groups.md").read_text() == render_summary(result, True)


def test_folds_that_trained_on_one_split_count_once(sqlite_uri, tmp_path):
    """Runs that differ only in their fold but hold one split digest (folds that were not folds)
    are one sample: n counts independent splits only, and the collapsed runs are named."""
    client = MlflowClient(sqlite_uri)
    ids = {(init, fold): log_run(client, "folds", init=init, seed=1, fold=fold, val_acc=[0.5, 0.8 + 0.01 * fold],
                                 start_time=1000 + fold, tags={"mlexp.split_digest": "same", "mlexp.config_hash":
                                                               f"{init}{fold}"})
           for init in ("pretrained", "scratch") for fold in range(3)}
    real = {init: log_run(client, "folds", init=init, seed=2, fold=0, val_acc=[0.5, 0.7], start_time=5000,
                          tags={"mlexp.split_digest": "other", "mlexp.config_hash": f"{init}-real"})
            for init in ("pretrained", "scratch")}
    other_lr = log_run(client, "other-lr", seed=1, fold=1, val_acc=[0.5, 0.6],
                       tags={"mlexp.split_digest": "same", "mlexp.config_hash": "lr"})
    client.log_param(other_lr, "notes", "a different configuration, on the same split: its own sample")
    result = compare(client, ["folds", "other-lr"], group_by=["init"], out_dir=tmp_path / "out", plots=False)
    assert set(result.runs["run_id"]) == {ids["pretrained", 0], ids["scratch", 0], *real.values(), other_lr}
    collapsed = {row["run_id"]: row["reason"] for row in result.excluded}
    assert set(collapsed) == {ids[init, fold] for init in ("pretrained", "scratch") for fold in (1, 2)}
    assert "fold 2 trained and validated on the same images as fold 0" in collapsed[ids["scratch", 2]]
    [gain] = result.comparisons[result.comparisons["kind"] == "init"].to_dict("records")
    assert gain["n"] == 2  # seed 1's one split and seed 2's, not 3 + 1 folds
    report = (tmp_path / "out" / "report.md").read_text()
    assert ids["scratch", 2] in report and "not as another fold" in report


def test_a_configuration_trained_twice_counts_once_and_is_listed(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    first = log_run(client, "dups", seed=1, val_acc=[0.5, 0.8], tags={"mlexp.config_hash": "aaaa"}, start_time=1000)
    again = log_run(client, "dups", seed=1, val_acc=[0.5, 0.9], tags={"mlexp.config_hash": "aaaa"}, start_time=2000)
    other = log_run(client, "dups", seed=2, val_acc=[0.5, 0.7], tags={"mlexp.config_hash": "bbbb"}, start_time=3000)
    result = compare(client, ["dups"], out_dir=tmp_path / "out", plots=False)
    assert set(result.runs["run_id"]) == {first, other}  # the first of the two trainings, and the other configuration
    assert result.groups["runs"].tolist() == [2]
    [duplicate] = result.excluded
    assert duplicate["run_id"] == again and duplicate["status"] == "DUPLICATE" and first in duplicate["reason"]
    assert "1 duplicate" in format_table(result) and again in format_table(result)


def test_one_time_unit_per_column(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    log_run(client, "units", val_acc=[0.5, 0.6, 0.7], epoch_time=100.0)  # 300 s in all: minutes
    log_run(client, "units", init="scratch", val_acc=[0.4, 0.5, 0.55], epoch_time=10.0)  # 30 s
    result = compare(client, ["units"], out_dir=tmp_path / "out", plots=False)
    rows, times = group_rows(result), comparison_rows(result, "time")
    assert [(r["total time (min)"], r["epoch time (s)"]) for r in rows] == [("5.0", "100.0"), ("0.5", "10.0")]
    assert (times[0]["diff (min)"], times[0]["95% CI (min)"]) == ("+4.5", "n too small")  # one pair
    for table in (rows, times):
        for column in [c for c in table[0] if "time" in c]:
            assert re.search(r"\((s|min|h)\)$", column) and all(TIME_CELL.match(r[column]) for r in table), column
    assert "total time (min)" in format_table(result)


def test_plots_zoom_label_and_colour_each_group(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    for seed, (pre, scr) in enumerate([(0.93, 0.88), (0.95, 0.89), (0.94, 0.9)], start=1):
        log_run(client, "high", seed=seed, val_acc=[0.8, 0.9, pre])
        log_run(client, "high", init="scratch", seed=seed, val_acc=[0.7, 0.85, scr])
        log_run(client, "high", strategy="linear", seed=seed, val_acc=[0.75, 0.86, pre - 0.02])
    result = compare(client, ["high"], out_dir=tmp_path / "out")
    ax = best_acc_figure(result).axes[0]
    low, high = ax.get_ylim()
    lowest = (result.groups["best_val_acc_mean"] - result.groups["best_val_acc_std"]).min() * 100
    assert 80 < low < lowest and high > result.groups["best_val_acc_mean"].max() * 100
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{100 * m:.1f}" for m in result.groups["best_val_acc_mean"])
    bar_colours = [to_hex(patch.get_facecolor()) for patch in ax.patches]
    assert len(set(bar_colours)) == len(result.groups) == 3

    styles = group_styles(result)
    curves = curves_figure(result.curves["val/acc"], 100.0, "Validation accuracy (%)", styles).axes[0]
    ticks = [tick for tick in curves.get_xticks() if 1 <= tick <= 3]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    line_colours = {line.get_label(): to_hex(line.get_color()) for line in curves.lines}
    assert len(set(line_colours.values())) == 3 and sorted(line_colours) == sorted(styles)
    assert line_colours == {name: to_hex(style["color"]) for name, style in styles.items()}  # same as the bars
    assert styles["resnet18_scratch/full"]["linestyle"] == "--"
    assert len(curves.collections) == 3  # a 95% band under each group's mean curve (3 seeds each)


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
    assert len(scratch.runs) == 5 and set(scratch.runs["_init"]) == {"scratch"}
    assert [row["status"] for row in scratch.excluded] == ["FAILED"]
    assert scratch.comparisons.empty


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
    assert result.groups.empty and result.comparisons.empty
    assert (tmp_path / "out" / "compare.json").is_file() and not (tmp_path / "out" / "best_acc_bar.png").exists()
    assert "No finished training runs match" in format_table(result)


def test_compare_run_is_logged_next_to_the_compared_experiment(store, sqlite_uri, tmp_path):
    client, special = store
    result = run_compare(sqlite_uri, ["cmp-a"], out_dir=tmp_path / "out")
    logged = client.get_run(result.run_id)
    assert client.get_experiment(logged.info.experiment_id).name == "cmp-a-compare"
    assert logged.info.run_name == "compare cmp-a by backbone,strategy"
    assert logged.info.status == "FINISHED" and logged.data.tags["mlexp.kind"] == "compare"
    assert not client.search_runs(["0"])  # nothing in MLflow's "Default" experiment

    filtered = run_compare(sqlite_uri, ["cmp-a", "cmp-b"], "params.lr = '0.001'", ["arch"], tmp_path / "f")
    assert client.get_run(filtered.run_id).info.run_name == "compare cmp-a+cmp-b by arch where params.lr = '0.001'"
    # --compare-experiment overrides: here the compared experiment itself; the next compare of it
    # counts that run as not a training run, and lists nothing new.
    inside = run_compare(sqlite_uri, ["cmp-b"], out_dir=tmp_path / "in", compare_experiment="cmp-b")
    assert client.get_run(inside.run_id).info.experiment_id == experiment_id(client, "cmp-b")
    again = compare(client, ["cmp-b"], out_dir=tmp_path / "again", plots=False)
    assert again.ignored["compare run"] == 2 and {r["run_id"] for r in again.excluded} == set(special.values())


def test_live_server_rest_path_and_compare_run(server_uri, tmp_path):
    client = MlflowClient(server_uri)
    experiment = f"cmp-live-{uuid.uuid4().hex[:6]}"
    populate_pairs(client, experiment)
    result = run_compare(server_uri, [experiment], out_dir=tmp_path / "out")
    summary = result.comparisons.iloc[0]
    assert (summary["kind"], summary["n"], summary["mean_diff"]) == ("init", 3, pytest.approx(0.25))
    assert group(result, backbone="resnet18_pretrained")["epoch_time_s_mean"] == pytest.approx(11.0)
    assert result.reads == {"taken": {"rest-search": 1, "history-bulk": 2}, "fallbacks": []}

    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert client.get_experiment(logged.info.experiment_id).name == f"{experiment}-compare"
    assert logged.info.run_name == f"compare {experiment} by backbone,strategy"
    assert logged.data.metrics["pretrain_gain/resnet18"] == pytest.approx(0.25)
    assert logged.data.params["compare.experiments"] == experiment
    assert {f.path for f in client.list_artifacts(result.run_id, "compare")} >= {f"compare/{n}" for n in FILES}

    # Under `mlflow run` the entry point passes the project's run: used, and left for `mlflow run` to end
    project_run = client.create_run(experiment_id(client, "cmp-project")).info.run_id
    again = run_compare(server_uri, [experiment], out_dir=tmp_path / "again", run_id=project_run)
    assert again.run_id == project_run and client.get_run(project_run).info.status == "RUNNING"
    assert client.get_run(project_run).data.tags["mlexp.kind"] == "compare"


def test_unreachable_server_is_a_user_error(tmp_path):
    with pytest.raises(MlexpError, match="cannot reach"):
        run_compare("http://127.0.0.1:9", ["x"], out_dir=tmp_path)


def test_two_equal_pairs_unequal_budgets_and_the_report(sqlite_uri, tmp_path):
    """The demo's case: two seed pairs that differ by the same -0.8 points, scratch trained one
    epoch longer. No zero-width interval, no p of 0; the budget is flagged and can be equalised."""
    client = MlflowClient(sqlite_uri)
    for seed, base in ((1, 0.97), (2, 0.98)):
        log_run(client, "demo", seed=seed, val_acc=[0.90, 0.95, base])
        log_run(client, "demo", init="scratch", seed=seed, val_acc=[0.85, 0.93, base - 0.002, base + 0.008])
        log_run(client, "demo", backbone="deit_small", seed=seed, val_acc=[0.7, 0.8, 0.8 + seed / 100])
        log_run(client, "demo", backbone="deit_small", init="scratch", seed=seed, val_acc=[0.6, 0.7, 0.7])
    result = compare(client, ["demo"], out_dir=tmp_path / "out", between_backbones=True)
    text = format_table(result)
    assert not re.search(r"\[([+-]?\d+\.\d), \1\]", text) and "0.000" not in text
    gains = result.comparisons[result.comparisons["kind"] == "init"].set_index("backbone")
    resnet = gains.loc["resnet18"]
    assert resnet["mean_diff"] == pytest.approx(-0.008) and resnet["p_value"] == 0.5 and math.isnan(resnet["ci_low"])
    assert "unequal budget: pretrained trained 3 epochs against scratch's 4" in resnet["note"]
    assert set(result.comparisons["kind"]) == {"init", "interaction", "backbone", "time", "convergence"}
    backbone_rows = result.comparisons[result.comparisons["kind"] == "backbone"]
    assert set(zip(backbone_rows["init"], backbone_rows["a"], backbone_rows["b"])) == {
        ("pretrained", "deit_small", "resnet18"), ("scratch", "deit_small", "resnet18")}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Not enough evidence" in report and "n = 2 pairs" in report and "p (Holm) = 0.000" not in report
    assert "unequal budget" in report and "adds" in report  # a negative gain: a relative error increase

    equal = compare(client, ["demo"], out_dir=tmp_path / "eq", plots=False, equal_budget=True)
    at_three = equal.comparisons.query("kind == 'init' and backbone == 'resnet18'").iloc[0]
    # at epoch 3 the scratch runs' best is base - 0.002: pretrained leads by +0.2 points in both pairs
    assert at_three["mean_diff"] == pytest.approx(0.002) and "compared at epoch 3" in at_three["note"]

    with pytest.raises(MlexpError, match="--metric 'test/acc' is not a metric of the compared runs"):
        compare(client, ["demo"], out_dir=tmp_path / "bad", plots=False, metric="test/acc")
    with pytest.raises(MlexpError, match="--equal-budget reads the val/acc curves"):
        compare(client, ["demo"], out_dir=tmp_path / "bad", plots=False, metric="val/loss", equal_budget=True)
    by_loss = compare(client, ["demo"], out_dir=tmp_path / "loss", plots=False, metric="val/loss")
    assert not by_loss.metric.higher_is_better and by_loss.metric.key == "val/loss"


def test_the_default_metric_is_the_runs_own_best_metric(sqlite_uri, tmp_path):
    """Runs that chose their best epoch by val/loss are compared on best/val_loss, lower better;
    runs that chose by different metrics fall back to best/val_acc, and the report says why."""
    client = MlflowClient(sqlite_uri)
    best = {("pretrained", 1): 0.9, ("pretrained", 2): 0.8, ("scratch", 1): 0.7, ("scratch", 2): 0.75}
    for (init, seed), top in best.items():
        log_run(client, "by-loss", init=init, seed=seed, val_acc=[0.5, top], best_metric="val/loss")
        log_run(client, "older", init=init, seed=seed, val_acc=[0.5, top], best_metric=None)  # before --best-metric
    result = compare(client, ["by-loss"], out_dir=tmp_path / "loss", plots=False)
    assert (result.metric.key, result.metric.higher_is_better) == ("best/val_loss", False)
    [gain] = result.comparisons[result.comparisons["kind"] == "init"].to_dict("records")
    losses = {key: 1.5 * (1 - top) for key, top in best.items()}  # what the runs logged as best/val_loss
    assert gain["mean_diff"] == pytest.approx(sum(losses["pretrained", s] - losses["scratch", s] for s in (1, 2)) / 2)
    report = (tmp_path / "loss" / "report.md").read_text()
    assert "Compared on best/val_loss: the runs' own best metric (--best-metric val/loss, best low)." in report
    assert "best/val_loss is optimistically biased" in report

    older = compare(client, ["older"], out_dir=tmp_path / "older", plots=False)
    assert (older.metric.key, older.metric.reason) == ("best/val_acc", "")
    mixed = compare(client, ["by-loss", "older"], group_by=["experiment", "init"], out_dir=tmp_path / "mixed",
                    plots=False)
    assert mixed.metric.key == "best/val_acc" and mixed.metric.higher_is_better
    line = "the runs chose their best epochs by different metrics (val/acc (max), val/loss (min))"
    assert line in mixed.metric.reason and line in (tmp_path / "mixed" / "report.md").read_text()
    assert line in format_table(mixed)
    log_run(client, "f1", val_acc=[0.5, 0.6], best_metric="val/macro_f1")  # chose by it, logged no best/val_macro_f1
    unlogged = compare(client, ["f1"], out_dir=tmp_path / "f1", plots=False)
    assert unlogged.metric.key == "best/val_acc" and "none logged best/val_macro_f1" in unlogged.metric.reason
    budget = compare(client, ["by-loss"], out_dir=tmp_path / "budget", plots=False, equal_budget=True)
    assert budget.metric.key == "best/val_acc" and "--equal-budget reads the val/acc curves" in budget.metric.reason
