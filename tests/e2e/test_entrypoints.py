"""`mlflow run . -e NAME` gives exactly what the CLI gives.

The same option sets go through the `mlexp` script and `mlflow run` (every MLproject entry
point; recipes; booleans written False/false/0/no; values equal to a default next to a recipe
that changes that default). Each launcher writes to a store of its own; the effective
`config.json` of every run must then be equal field by field, and so must compare's tables
and monitor's summary over one shared store (there `python -m mlexp` too).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import ROOT, runs_of, subprocess_env
from tests.run_factory import log_run

pytestmark = pytest.mark.slow

LAUNCHERS = ("mlexp", "python -m mlexp", "mlflow run")
# The training cases go through the `mlexp` script and `mlflow run`, side by side; `python -m mlexp`
# runs the same main() (every other command test starts mlexp that way), so it is compared on
# compare's and monitor's output only, where the three launchers are cheap.
TRAINING_LAUNCHERS = ("mlexp", "mlflow run")
# entry point -> the CLI command it is
COMMANDS = {"main": "train", "train": "train", "pretrain": "pretrain", "sweep": "sweep", "tune": "tune",
            "compare": "compare", "monitor": "monitor"}
TRAINING = ("main", "train", "pretrain", "sweep", "tune")
TINY = {"backbone": "test_resnet", "data": "digits", "img_size": "16", "epochs": "1", "batch_size": "64"}

TRAINING_CASES = {
    # a value equal to the plain default, next to a recipe whose preset changes it: the value wins
    "recipe-and-default-lr": ("train", {**TINY, "init": "scratch", "recipe": "finetune", "lr": "0.001"}),
    # booleans in every spelling; `main` is the plain training entry point
    "booleans": ("main", {**TINY, "init": "scratch", "recipe": "linear-probe", "ema": "False", "calibrate": "no",
                          "channels_last": "0", "linear_probe_epochs": "1"}),
    # pretrain's own defaults (export on, its recipe) with export switched off and lr given
    "pretrain-no-export": ("pretrain", {**TINY, "export_weights": "false", "lr": "0.001", "warmup_epochs": "0"}),
    "pretrain-defaults": ("pretrain", {**TINY, "epochs": "1"}),
    # two children at once (each in its own process): `-P parallel=2` as `--parallel 2`
    "sweep": ("sweep", {"backbones": "test_resnet", "inits": "scratch", "seeds": "3,4", "data": "digits",
                        "img_size": "16", "epochs": "1", "batch_size": "64", "recipe": "finetune",
                        "lr": "0.001", "ema": "false", "parallel": "2"}),
    # a study's two trials (a seeded grid: the same order under every launcher), then its final run
    "tune": ("tune", {"backbones": "test_resnet", "inits": "scratch", "space": "lr=0.003,0.03", "sampler": "grid",
                      "trials": "2", "pruner": "none", "final_seeds": "1", "data": "digits", "img_size": "16",
                      "epochs": "1", "batch_size": "64", "log_models": "false"}),
}


def launch(launcher: str, entry: str, params: dict[str, str], env: dict, cwd: Path,
           project_experiment: str = "entry-points"):
    """One launch; `mlflow run` puts its own run in the training run's experiment (or
    `project_experiment` for compare and monitor, away from the runs they read)."""
    if launcher == "mlflow run":
        command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
                   "--experiment-name", params["experiment"] if entry in TRAINING else project_experiment]
        for name, value in params.items():
            command += ["-P", f"{name}={value}"]
    else:
        prefix = ["mlexp"] if launcher == "mlexp" else [sys.executable, "-m", "mlexp"]
        command = [*prefix, COMMANDS[entry]]
        for name, value in params.items():
            command += [f"--{name.replace('_', '-')}", value]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{launcher} {entry}: {done.stderr[-3000:]}"
    return done


def launcher_env(tmp_path: Path, launcher: str) -> tuple[dict, Path]:
    home = tmp_path / launcher.replace(" ", "-")
    (home / "weights").mkdir(parents=True, exist_ok=True)
    env = subprocess_env(f"sqlite:///{home / 'mlflow.db'}", MLEXP_WEIGHTS_DIR=str(home / "weights"))
    return env, home


def training_configs(uri: str, experiment: str) -> list[dict]:
    """config.json of each training run (a sweep's children, not its parent), by run name."""
    client = MlflowClient(uri)
    configs = []
    for run in sorted(runs_of(client, experiment), key=lambda r: r.info.run_name):
        if any(item.path == "config.json" for item in client.list_artifacts(run.info.run_id)):
            configs.append(json.loads(Path(client.download_artifacts(run.info.run_id, "config.json")).read_text()))
    return configs


def test_every_training_entry_point_gives_the_cli_config(tmp_path):
    def run_cases(launcher: str) -> tuple[dict[str, list[dict]], list[str]]:
        env, home = launcher_env(tmp_path, launcher)
        configs = {}
        for case, (entry, params) in TRAINING_CASES.items():
            launch(launcher, entry, {**params, "experiment": case}, env, home)
            configs[case] = training_configs(env["MLFLOW_TRACKING_URI"], case)
        return configs, sorted(path.name for path in (home / "weights").iterdir())

    # Two launchers at a time, each in its own folder and store, one thread per process: 2 cores.
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(TRAINING_LAUNCHERS, pool.map(run_cases, TRAINING_LAUNCHERS)))
    outcomes: dict[str, dict[str, list[dict]]] = {}
    exported: dict[str, list[str]] = {}
    for launcher, (configs, weights) in results.items():
        for case, found in configs.items():
            outcomes.setdefault(case, {})[launcher] = found
        exported[launcher] = weights
    for case, by_launcher in outcomes.items():
        reference = by_launcher["mlexp"]
        assert reference, f"{case}: no training run"
        for launcher, configs in by_launcher.items():
            assert len(configs) == len(reference), (case, launcher)
            for ours, theirs in zip(configs, reference):
                differing = {key: (ours.get(key), theirs.get(key)) for key in theirs.keys() | ours.keys()
                             if ours.get(key) != theirs.get(key)}
                assert not differing, f"{case}: {launcher} differs from the CLI: {differing}"
    assert outcomes["recipe-and-default-lr"]["mlflow run"][0]["lr"] == pytest.approx(0.0015)  # 0.001 x scratch 1.5
    assert outcomes["booleans"]["mlflow run"][0]["ema"] is False
    assert outcomes["pretrain-no-export"]["mlflow run"][0]["export_weights"] is False
    assert outcomes["pretrain-defaults"]["mlflow run"][0]["export_weights"] is True
    tuned = sorted(config["lr"] for config in outcomes["tune"]["mlflow run"])
    assert len(tuned) == 3 and set(tuned) == {0.003, 0.03}  # two trials, and the final run with the best one's lr
    # `mlflow run -e tune`'s own run is the study's parent, not an empty run beside it
    project_uri = launcher_env(tmp_path, "mlflow run")[0]["MLFLOW_TRACKING_URI"]
    [study] = [run for run in runs_of(MlflowClient(project_uri), "tune") if run.data.tags.get("mlexp.kind") == "study"]
    assert study.data.tags["mlflow.project.entryPoint"] == "tune" and study.info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in runs_of(MlflowClient(project_uri), "tune")
            if "mlexp.study_stage" in run.data.tags} == {study.info.run_id}
    # only the pretrain run that kept its default exported weights, under every launcher
    assert exported["mlexp"] == ["test_resnet.safetensors"]
    assert all(names == exported["mlexp"] for names in exported.values()), exported


def test_compare_and_monitor_entry_points_give_the_cli_output(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    client = MlflowClient(uri)
    for seed, (pre, scr) in enumerate([(0.9, 0.8), (0.92, 0.79), (0.91, 0.82)], start=1):
        log_run(client, "grid", init="pretrained", seed=seed, val_acc=[0.5, pre])
        log_run(client, "grid", init="scratch", seed=seed, val_acc=[0.4, scr])
    def run_both(launcher: str) -> tuple[str, str]:
        home = tmp_path / launcher.replace(" ", "-")
        home.mkdir()
        env = subprocess_env(uri)
        launch(launcher, "compare", {"experiment": "grid", "group_by": "backbone,init", "out": str(home / "cmp"),
                                     "log_run": "false"}, env, home)
        done = launch(launcher, "monitor", {"summary": "true", "experiment": "grid"}, env, home)
        return (home / "cmp" / "groups.csv").read_text(), done.stdout

    with ThreadPoolExecutor(2) as pool:  # they only read the shared store
        results = dict(zip(LAUNCHERS, pool.map(run_both, LAUNCHERS)))
    tables = {launcher: table for launcher, (table, _) in results.items()}
    summaries = {launcher: summary for launcher, (_, summary) in results.items()}
    assert "pretrained" in tables["mlexp"] and "91.0%" in summaries["mlexp"]
    assert all(table == tables["mlexp"] for table in tables.values()), tables
    assert all(summary == summaries["mlexp"] for summary in summaries.values()), summaries
