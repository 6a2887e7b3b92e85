"""A task of the user's own (tests/own_task/mytasks.py: regression of a digit's ink, with a loss
of two parts), plugged in as the README's "Your own task" says: `--task MODULE:CLASS` from the
folder the user works in, and by name once a package declares it (the `mlexp.tasks` entry
points of an installed distribution). It trains with its parts on every batch, its own metrics
every epoch and on the test split, survives a SIGKILL and resumes with one point per step,
sweeps, and compare measures it by its own primary metric. With its serving part (example_input,
predict) its runs log MLflow models: registered, and served from a folder that holds neither
the module nor the package's declaration, they answer as the same weights do in this process."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.datasets import load_digits

from mlexp.tasks.kinds import task_named
from tests.helpers import artifact_paths, run_mlexp, runs_of, steps, subprocess_env

pytestmark = pytest.mark.slow
TASK = "mytasks:InkRegression"
COMMON = ["--backbone", "test_resnet", "--init", "scratch", "--img-size", "16", "--batch-size", "128",
          "--scratch-epochs-mult", "1", "--system-metrics", "false"]


def project(tmp_path: Path) -> Path:
    """The user's folder, with their module; and an installed distribution declaring it as `ink`."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(Path(__file__).parents[1] / "own_task" / "mytasks.py", folder / "mytasks.py")
    declared = tmp_path / "site" / "mytasks_pkg-0.1.dist-info"
    declared.mkdir(parents=True)
    (declared / "METADATA").write_text("Metadata-Version: 2.1\nName: mytasks-pkg\nVersion: 0.1\n")
    (declared / "entry_points.txt").write_text(f"[mlexp.tasks]\nink = {TASK}\n")
    return folder


def test_a_users_own_task_trains_resumes_sweeps_and_compares_on_its_own_metric(sqlite_uri, tmp_path):
    folder = project(tmp_path)
    env = subprocess_env(sqlite_uri, PYTHONPATH=str(tmp_path / "site"))
    args = ["train", "--task", TASK, *COMMON, "--epochs", "3", "--experiment", "ink"]
    # 9 steps an epoch (1257 images, the last part dropped): step 15 is inside epoch 2
    killed = run_mlexp(args, {**env, "MLEXP_FAULT": "step=15"}, folder)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "ink")
    resumed = run_mlexp(["train", "--resume", run.info.run_id], env, folder)
    assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr[-3000:]
    assert "logged models best and final" in resumed.stdout

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["task"] == TASK and run.data.params["best_metric"] == "val/r2"
    assert run.data.params["best_mode"] == "max"  # the task's own say
    for key in ("batch/loss", "batch/loss_mse", "batch/loss_l1"):  # one point per optimizer step, none twice
        assert steps(client, run.info.run_id, key) == list(range(1, 28)), key
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("batch/loss", "batch/loss_mse", "batch/loss_l1")}
    assert all(math.isclose(history["batch/loss"][step], history["batch/loss_mse"][step]
                            + history["batch/loss_l1"][step], rel_tol=1e-4) for step in range(1, 28))
    for key in ("val/r2", "val/mae", "train/loss_mse", "train/loss_l1"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key
    r2 = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/r2"), key=lambda m: m.step)]
    assert run.data.metrics["best/val_r2"] == max(r2) and run.data.metrics["best/epoch"] == 1 + r2.index(max(r2))
    assert {"test/r2", "test/mae", "test/epoch"} <= set(run.data.metrics)
    files = artifact_paths(client, run.info.run_id)
    assert {"checkpoints/final/model.safetensors", "metrics/epoch_metrics.csv", "config.json"} <= files
    with open(client.download_artifacts(run.info.run_id, "metrics/epoch_metrics.csv", str(tmp_path))) as table:
        columns = next(csv.reader(table))
    assert {"val/r2", "val/mae", "train/loss_mse"} <= set(columns) and "val/acc" not in columns
    served_like_the_run(client, run.info.run_id, env, tmp_path)

    # by the name the installed distribution declares, swept over two seeds, then compared on val/r2
    swept = run_mlexp(["sweep", "--task", "ink", "--backbones", "test_resnet", "--inits", "scratch", "--seeds", "1,2",
                       *COMMON[4:], "--epochs", "1", "--experiment", "ink-sweep"], env, folder, timeout=600)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    summed_up_by_its_own_metric(client, swept.stdout, env, folder, tmp_path)
    compared = run_mlexp(["compare", "--experiment", "ink-sweep", "--out", str(tmp_path / "cmp"), "--log-run",
                          "false"], env, folder)
    assert compared.returncode == 0, compared.stderr[-3000:]
    with open(tmp_path / "cmp" / "groups.csv") as table:
        [group] = list(csv.DictReader(table))
    assert group["runs"] == "2" and "best_val_r2_mean" in group and "best_val_acc_mean" not in group
    assert "Compared metric: **test/r2**" in (tmp_path / "cmp" / "report.md").read_text()
    assert (tmp_path / "cmp" / "val_r2_curves.png").stat().st_size > 5000  # its own curve, fetched by its name


def summed_up_by_its_own_metric(client: MlflowClient, said: str, env: dict, folder: Path, tmp_path: Path) -> None:
    """The sweep's summary and `mlexp monitor` rank the task's runs by the metric they chose
    their best epoch by (val/r2), as they rank classifiers by accuracy."""
    children = [run for run in runs_of(client, "ink-sweep") if "mlflow.parentRunId" in run.data.tags]
    [parent] = [run for run in runs_of(client, "ink-sweep") if "mlflow.parentRunId" not in run.data.tags]
    best = max(children, key=lambda run: run.data.metrics["best/val_r2"])
    assert "best val r2" in said and all(f"best val r2 {run.data.metrics['best/val_r2']:.4f}" in said
                                         for run in children)
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary/sweep_summary.json",
                                                        str(tmp_path))).read_text())
    [row] = summary["best"]  # one backbone
    assert row["run_id"] == best.info.run_id and row["best_val_r2"] == best.data.metrics["best/val_r2"]
    monitored = run_mlexp(["monitor", "--summary", "true", "--experiment", "ink-sweep"], env, folder)
    assert monitored.returncode == 0, monitored.stderr[-2000:]
    assert "2 finished training run(s)" in monitored.stdout and "best val score" in monitored.stdout
    assert f"{best.data.metrics['best/val_r2']:.4f} r2" in monitored.stdout  # its value as it is, not a percentage
    loads_where_its_name_is_declared_nowhere(client, best.info.run_id, env, tmp_path)
    assert monitored.stdout.index(best.info.run_name) < monitored.stdout.index(
        next(run.info.run_name for run in children if run is not best))  # best first


def loads_where_its_name_is_declared_nowhere(client: MlflowClient, run_id: str, env: dict, tmp_path: Path) -> None:
    """A model of a run trained as `--task ink` loads and predicts in a fresh process that has
    neither the module nor the `ink` declaration: it rebuilds its task from MODULE:CLASS."""
    [model] = [m for m in client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                                      filter_string=f"source_run_id = '{run_id}'") if m.name == "best"]
    elsewhere = tmp_path / "nowhere-declared"
    elsewhere.mkdir()
    script = ("import sys, mlflow.pyfunc; from sklearn.datasets import load_digits; "
              "print(mlflow.pyfunc.load_model(sys.argv[1]).predict(load_digits().images[:2])['ink'].tolist())")
    done = subprocess.run([sys.executable, "-c", script, f"models:/{model.model_id}"], env={**env, "PYTHONPATH": ""},
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout.strip().splitlines()[-1])) == 2


def served_like_the_run(client: MlflowClient, run_id: str, env: dict, tmp_path: Path) -> None:
    """`mlexp register` names the run's best model; `mlflow models serve` of it, started where
    neither mytasks.py nor the `ink` declaration is (the module's source travels in the model),
    answers a POST of 2 digits with the ink the same weights give in this process."""
    from tests.e2e.test_models_e2e import served_predictions

    registered = run_mlexp(["register", "--name", "ink-model", "--experiment", "ink"], env, tmp_path)
    assert registered.returncode == 0, registered.stderr[-2000:]
    assert "task mytasks:InkRegression" in client.get_registered_model("ink-model").description
    [best] = [model for model in client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                                             filter_string=f"source_run_id = '{run_id}'")
              if model.name == "best"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    digits = load_digits().images[-2:]  # 8 x 8, as the task's example_input shows
    served = served_predictions("models:/ink-model@champion", digits, {**env, "PYTHONPATH": ""}, elsewhere)
    try:
        local = mlflow.pyfunc.load_model(f"models:/{best.model_id}").predict(digits)
    finally:  # the model imported mytasks (from its code/) into this test process
        sys.modules.pop("mytasks", None)
        task_named.cache_clear()
    assert list(served.columns) == ["ink"] and len(served) == 2
    assert np.allclose(served["ink"], local["ink"], atol=1e-5)


def test_a_task_that_is_not_one_is_one_line_before_any_run(sqlite_uri, tmp_path):
    folder = project(tmp_path)
    env = subprocess_env(sqlite_uri)  # no task declared by an installed distribution here
    done = run_mlexp(["train", "--task", "mytasks:NoSuchTask", *COMMON, "--epochs", "1", "--experiment", "refused"],
                     env, folder)
    said = "--task mytasks:NoSuchTask: module 'mytasks' has no 'NoSuchTask'"
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not runs_of(MlflowClient(sqlite_uri), "refused")
