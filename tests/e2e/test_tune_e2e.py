"""`mlexp tune` end to end on digits: two arms (pretrained with weights written here, scratch)
tuned with equal budgets, hopeless trials pruned with their curves kept, each arm's best
retrained over paired seeds and compared; a study SIGKILLed mid-way finishes with no trial
trained twice; the same seed proposes the same trials; bad inputs are one line."""

from __future__ import annotations

import csv
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.faults import mlexp_process, read_until
from tests.helpers import run_mlexp, runs_of, steps, subprocess_env, write_pretrained_weights

pytestmark = pytest.mark.slow
# Wide enough that some trials are hopeless (a learning rate of 1e-6 learns nothing in 3 epochs).
SPACE = "lr=1e-6:0.3:log,weight_decay=0:0.1"
COMMON = ["tune", "--backbones", "test_resnet", "--space", SPACE, "--data", "digits", "--img-size", "16",
          "--calibrate", "false", "--system-metrics", "false", "--log-models", "false"]


def trial_runs(client: MlflowClient, experiment: str) -> list:
    return [run for run in runs_of(client, experiment) if run.data.tags.get("mlexp.study_stage") == "trial"]


def test_two_arms_get_equal_budgets_pruning_a_final_stage_and_a_paired_comparison(sqlite_uri, tmp_path):
    write_pretrained_weights(tmp_path / "weights", "test_resnet", "test_resnet")
    env = subprocess_env(sqlite_uri, MLEXP_WEIGHTS_DIR=str(tmp_path / "weights"))
    done = run_mlexp([*COMMON, "--trials", "6", "--epochs", "3", "--pruner", "median", "--final-seeds", "1,2,3",
                      "--experiment", "tuned"], env, tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(sqlite_uri)
    trials = trial_runs(client, "tuned")
    per_arm = Counter(run.data.tags["mlexp.arm"] for run in trials)
    assert per_arm == {"test_resnet_pretrained-full": 6, "test_resnet_scratch-full": 6}
    assert {run.info.status for run in trials} == {"FINISHED"}
    pruned = [run for run in trials if run.data.tags["mlexp.trial_state"] == "PRUNED"]
    assert pruned, "no trial pruned"  # its curve kept, cut short
    assert all(0 < len(steps(client, run.info.run_id, "val/acc")) < 3 for run in pruned)
    complete = [run for run in trials if run.data.tags["mlexp.trial_state"] == "COMPLETE"]
    assert all(steps(client, run.info.run_id, "val/acc") == [1, 2, 3] for run in complete)
    # the sampled values are the runs' effective params; the scratch multipliers are off
    assert all(run.data.params["scratch_lr_mult"] == "1.0" and float(run.data.params["lr"]) <= 0.3 for run in trials)
    finals = [run for run in runs_of(client, "tuned") if run.data.tags.get("mlexp.study_stage") == "final"]
    assert sorted((run.data.tags["mlexp.init"], run.data.params["seed"]) for run in finals) == [
        (init, seed) for init in ("pretrained", "scratch") for seed in ("1", "2", "3")]
    [parent] = [run for run in runs_of(client, "tuned") if run.data.tags.get("mlexp.kind") == "study"]
    assert parent.info.status == "FINISHED" and {run.data.tags["mlflow.parentRunId"] for run in trials + finals} == {
        parent.info.run_id}
    out = next((tmp_path / "mlexp-output" / "tune").glob("study-*/compare"))
    with open(out / "comparisons.csv") as table:
        [gain] = [row for row in csv.DictReader(table) if row["kind"] == "init"]
    assert int(gain["n"]) == 3  # pretrained vs scratch, paired on the three final seeds
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "Budgets: **equal**, 6 trial(s) of 3 epoch(s) per arm" in report
    assert "What the search says" in report
    assert re.search(r"\| test_resnet_pretrained-full \| 6 \| 3 \| \d \| \d \|", report)
    [logged] = runs_of(client, "tuned-compare")  # the report, tuning section included, as a compare run's artifact
    assert logged.info.run_name.startswith("tune study-") and logged.info.status == "FINISHED"
    assert "## Tuning" in Path(client.download_artifacts(logged.info.run_id, "compare/report.md",
                                                         str(tmp_path))).read_text()
    plots = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "study_plots")}
    assert plots == {f"study_plots/test_resnet_{init}-full_{kind}.png" for init in ("pretrained", "scratch")
                     for kind in ("slice", "parallel_coordinate")}
    assert all(artifact.file_size > 5000 for artifact in client.list_artifacts(parent.info.run_id, "study_plots"))

    again = run_mlexp([*COMMON, "--trials", "6", "--epochs", "3", "--pruner", "median", "--final-seeds", "1,2,3",
                       "--experiment", "tuned"], env, tmp_path, timeout=900)
    assert again.returncode == 0 and " trial " not in again.stdout.replace("with trial", "")  # nothing trains again
    assert len(trial_runs(client, "tuned")) == 12


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_study_stopped_mid_way_finishes_with_no_trial_trained_twice(stop, sqlite_uri, tmp_path):
    """SIGKILL (nothing cleans up), or Ctrl-C (the trial's run ends KILLED): either way the
    trial stays the study's, and the same command resumes it in its run."""
    env = subprocess_env(sqlite_uri, MLEXP_HEARTBEAT_S="1")  # a killed trainer is seen gone within seconds
    args = [*COMMON, "--inits", "scratch", "--trials", "4", "--epochs", "3", "--pruner", "none", "--final-seeds",
            "1", "--experiment", "killed"]
    launcher = mlexp_process(args, env, tmp_path)
    seen: list[str] = []
    read_until(launcher, "mlexp: test_resnet_scratch-full trial 3/4", seen)
    read_until(launcher, "epoch   1", seen)  # inside the third trial, its first checkpoint written
    launcher.send_signal(stop)
    assert launcher.wait(timeout=120) == (-9 if stop == signal.SIGKILL else 130)
    done = run_mlexp(args, env, tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the killed trial continues in its own run (from its checkpoint, or over if it had none yet)
    assert re.search(r"mlexp: (resuming run|run \w+ has no complete checkpoint yet)", done.stdout), done.stdout[-3000:]
    client = MlflowClient(sqlite_uri)
    trials = trial_runs(client, "killed")
    numbers = Counter(run.data.tags["mlexp.trial_number"] for run in trials)
    assert numbers == {"0": 1, "1": 1, "2": 1, "3": 1}  # four trials, each in one run
    for run in trials:  # each trained each epoch once
        assert steps(client, run.info.run_id, "val/acc") == [1, 2, 3], run.data.tags["mlexp.trial_number"]


def test_a_grid_search_tries_each_listed_value_once_and_finishes(sqlite_uri, tmp_path):
    """Optuna's grid sampler stops its study once the grid is done; the study still finishes."""
    args = ["tune", "--backbones", "test_resnet", "--inits", "scratch", "--space", "lr=0.003,0.03", "--sampler",
            "grid", "--trials", "2", "--epochs", "1", "--pruner", "none", "--final-seeds", "1", "--data", "digits",
            "--img-size", "16", "--calibrate", "false", "--system-metrics", "false", "--log-models", "false",
            "--experiment", "grid"]
    done = run_mlexp(args, subprocess_env(sqlite_uri), tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    trials = trial_runs(MlflowClient(sqlite_uri), "grid")
    assert sorted(float(run.data.params["lr"]) for run in trials) == [0.003, 0.03]


def test_the_same_seed_proposes_the_same_trials_in_two_empty_stores(tmp_path):
    proposals = []
    for store in ("a", "b"):
        folder = tmp_path / store
        folder.mkdir()
        done = run_mlexp([*COMMON, "--inits", "scratch", "--sampler", "tpe", "--search-seed", "7", "--trials", "2",
                          "--epochs", "1", "--pruner", "none", "--final-seeds", "1", "--experiment", "seeded"],
                         subprocess_env(f"sqlite:///{folder / 'mlflow.db'}"), folder, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        proposals.append([line for line in done.stdout.splitlines() if " trial " in line and ": lr=" in line])
    assert len(proposals[0]) == 2 and proposals[0] == proposals[1]


@pytest.mark.parametrize("change, said", [
    (("--space", "momentum_typo=0:1"), "'momentum_typo' is not a training option a study can tune"),
    (("--space", "lr=0.1:0.01"), "the low end 0.1 is above the high end 0.01"),
    (("--space", "lr=0:0.1:log"), "a log range must stay above 0"),
    (("--trials", "0"), "--trials must be at least 1"),
    (("--space", "lr=0.001:0.1", "--sampler", "grid"), "--sampler grid needs listed values for lr"),
    (("--storage", "postgresql://mlexp:secret@db/optuna"), "--storage must not carry a password"),
    (("--parallel", "0"), "--parallel must be at least 1"),
    (("--ray-address", "127.0.0.1:1"), "--ray-address needs --executor ray"),
    (("--parallel", "2", "--gpus-per-run", "2"), "a trial trains in its worker's own process"),
])
def test_bad_tuning_inputs_are_one_line_and_create_nothing(change, said, sqlite_uri, tmp_path):
    args = [*COMMON, "--inits", "scratch", "--experiment", "bad"]
    if change[0] == "--space":
        args[args.index("--space") + 1] = change[1]
        change = change[2:]
    done = run_mlexp([*args, *change], subprocess_env(sqlite_uri), tmp_path)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not runs_of(MlflowClient(sqlite_uri), "bad") and not Path(tmp_path / "mlexp-output" / "tune").exists()


def test_two_launchers_of_one_study_train_each_trial_once(server_uri, tmp_path):
    """Against a live server (two processes creating one SQLite store at once race on its schema).
    The second launcher trains with two worker processes (--parallel 2): three trainings at once."""
    env = subprocess_env(server_uri, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # three trainings on two cores
    args = [*COMMON, "--inits", "scratch", "--trials", "4", "--epochs", "2", "--pruner", "none", "--final-seeds",
            "1,2", "--experiment", "raced"]
    launchers = [mlexp_process(args, env, tmp_path), mlexp_process([*args, "--parallel", "2"], env, tmp_path)]
    outputs = [launcher.communicate(timeout=900)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], [output[-2000:] for output in outputs]
    assert "2 worker process(es) on this machine, 1 CPU thread(s) each" in outputs[1], outputs[1][-2000:]
    assert re.search(r"study study-\w+: 4/4 trial\(s\) ended \(0 pruned\)", outputs[1]), outputs[1][-2000:]
    workers = sorted(path.name for path in (tmp_path / "mlexp-output" / "tune").glob("study-*/workers/*.log"))
    assert workers == ["worker-0.log", "worker-1.log"]
    client = MlflowClient(server_uri)
    numbers = Counter(run.data.tags["mlexp.trial_number"] for run in trial_runs(client, "raced"))
    assert numbers == {"0": 1, "1": 1, "2": 1, "3": 1}
    finals = [run for run in runs_of(client, "raced") if run.data.tags.get("mlexp.study_stage") == "final"]
    assert sorted(run.data.params["seed"] for run in finals) == ["1", "2"]
    assert {run.info.status for run in finals} == {"FINISHED"}
    studies = [run for run in runs_of(client, "raced") if run.data.tags.get("mlexp.kind") == "study"]
    assert len(studies) == 1  # one parent, whichever launcher made it
