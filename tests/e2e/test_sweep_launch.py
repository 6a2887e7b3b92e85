"""A sweep's children in their own processes: --parallel, claims against racing launchers,
Ctrl-C and the same command again, and bad launch options. Real server, real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlexp.tracking import claims
from tests.faults import DIGITS_TRAIN
from tests.helpers import run_mlexp, runs_of, steps, subprocess_env
from tests.warm_start import as_from_a_terminal

BATCH = 64
GRID = ["sweep", "--backbones", "test_resnet", "--inits", "scratch", "--data", "digits", "--img-size", "16",
        "--scratch-epochs-mult", "1", "--calibrate", "false", "--batch-size", str(BATCH)]
FOUR = [*GRID, "--seeds", "1,2,3,4", "--epochs", "1"]


def sweep_runs(client: MlflowClient, experiment: str) -> tuple[object, list]:
    """(the parent, its children) of the experiment's one sweep."""
    runs = runs_of(client, experiment)
    parents = [run for run in runs if run.data.tags.get("mlexp.sweep") == "true"]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    return parents[0], [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def assert_each_trained_once(client: MlflowClient, children: list, epochs: int, batch: int = BATCH) -> None:
    """FINISHED, one configuration per child, one batch/loss point per step: no duplicate, no gap."""
    assert all(run.info.status == "FINISHED" for run in children), [r.data.tags.get("mlexp.error") for r in children]
    assert len({run.data.tags["mlexp.config_hash"] for run in children}) == len(children)
    for run in children:
        assert steps(client, run.info.run_id, "batch/loss") == list(range(1, epochs * (DIGITS_TRAIN // batch) + 1))


def most_at_once(children: list) -> int:
    """The most children running at one moment, from their runs' start and end times."""
    events = sorted([(run.info.start_time, 1) for run in children] + [(run.info.end_time, -1) for run in children])
    running = most = 0
    for _, change in events:  # at a tie an end sorts first (-1 < 1): back-to-back is not overlap
        running += change
        most = max(most, running)
    return most


def parallel_2_sweep(uri: str, seeds: str, experiment: str, folder: Path):
    """`mlexp sweep --parallel 2` of one tiny epoch per seed against `uri`, checked: every child
    FINISHED under one FINISHED parent, trained once, two at once. (output, parent, children)"""
    done = run_mlexp([*GRID, "--seeds", seeds, "--epochs", "1", "--experiment", experiment, "--parallel", "2"],
                     subprocess_env(uri), folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    parent, children = sweep_runs(client, experiment)
    assert len(children) == len(seeds.split(",")) and parent.info.status == "FINISHED"
    assert_each_trained_once(client, children, epochs=1)
    assert most_at_once(children) == 2
    return done, parent, children


@pytest.mark.slow
def test_parallel_2_trains_4_children_in_their_own_processes_at_most_2_at_once(server_uri, tmp_path):
    done, parent, children = parallel_2_sweep(server_uri, "1,2,3,4", "parallel", tmp_path)
    assert "2 at a time on this machine, 1 CPU thread(s) each" in done.stdout
    assert done.stdout.count(" started ") == 4 and done.stdout.count("] FINISHED ") == 4
    # a log per child, holding its own command and its own run's outcome
    logs = sorted((tmp_path / "mlexp-output" / "sweeps" / parent.info.run_id).glob("*.log"))
    assert len(logs) == 4
    for log, child in zip(logs, sorted(children, key=lambda run: int(run.data.tags["mlexp.sweep_index"]))):
        text = log.read_text()
        assert f"--run-id {child.info.run_id}" in text and f"run {child.info.run_id} FINISHED" in text
    assert parent.data.metrics["sweep/finished"] == 4 and parent.data.metrics["sweep/remaining"] == 0


@pytest.mark.slow
def test_two_launchers_of_one_grid_train_each_configuration_once(server_uri, tmp_path):
    env = subprocess_env(server_uri)
    # one core per child: two launchers on 2 cores, each unaware of the other, must not oversubscribe
    args = [sys.executable, "-m", "mlexp", *FOUR, "--experiment", "two-launchers", "--cpus-per-run", "1"]
    launchers = [subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    client = MlflowClient(server_uri)
    parent, children = sweep_runs(client, "two-launchers")  # one parent: both found or made the same
    assert len(children) == 4
    assert_each_trained_once(client, children, epochs=1)
    # every configuration claimed once (attempt 1), started once across both launchers
    assert sorted(key.rsplit(".", 1)[1] for key in parent.data.params if key.startswith(claims.CLAIM)) == ["1"] * 4
    assert sum(output.count(" started ") for output in outputs) == 4
    assert all("4 finished" in output or "finished by another launcher" in output for output in outputs)


@pytest.mark.slow
def test_racing_claims_on_the_server_have_exactly_one_winner(server_uri):
    """The race itself, made tight: 8 threads released together by a barrier each try to
    create the grid's parent (some a few milliseconds late, so they arrive while the first
    ones are settling it), then each tries to claim one configuration's first attempt."""
    client = MlflowClient(server_uri)
    experiment_id = client.create_experiment("claims-race")
    barrier = threading.Barrier(8)
    parents, attempts = [], []

    def contender(index: int) -> None:
        barrier.wait()
        time.sleep(0.04 * (index % 4))
        create = lambda: client.create_run(experiment_id, tags={claims.GRID_TAG: "g1"}).info.run_id  # noqa: E731
        parent, _ = claims.sweep_parent(client, experiment_id, "g1", create)
        parents.append(parent)
        barrier.wait()
        attempts.append(claims.claim(client, experiment_id, parent, "h1", f"owner{index}"))

    threads = [threading.Thread(target=contender, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(parents)) == 1  # every contender ended with the same parent...
    assert claims.grid_runs(client, experiment_id, "g1") == parents[:1]  # ...and the losers' candidates are gone
    winners = [attempt for attempt in attempts if attempt is not None]
    assert len(winners) == 1 and winners[0].number == 1
    assert client.get_run(parents[0]).data.params == {winners[0].key: winners[0].value}


@pytest.mark.slow
def test_ctrl_c_ends_children_killed_and_the_same_command_resumes_them_in_their_runs(server_uri, tmp_path):
    env = subprocess_env(server_uri, MLEXP_PROGRESS_S="1")
    args = [*GRID, "--seeds", "1,2", "--epochs", "10", "--parallel", "2", "--experiment", "interrupted"]
    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    launcher = subprocess.Popen([sys.executable, "-m", "mlexp", *args], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=as_from_a_terminal)
    client = MlflowClient(server_uri)
    deadline = time.time() + 300
    # Both children in their second epoch (the first one's checkpoint is in their outboxes), read
    # from their own logs: asking the server, busy with both children's writes, can take longer
    # than a tiny child's whole training.
    while time.time() < deadline and launcher.poll() is None:
        logs = list((tmp_path / "mlexp-output" / "sweeps").glob("*/*.log"))
        if len(logs) == 2 and all("epoch   2 " in log.read_text() for log in logs):
            break
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 130, f"pytest's SIGINT handler and mask: {inherited}\n{output[-3000:]}"
    parent, children = sweep_runs(client, "interrupted")
    assert parent.info.status == "KILLED" and sorted(run.info.status for run in children) == ["KILLED", "KILLED"]
    assert "run the same command again" in output

    again = run_mlexp(args, env, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    parent_after, children_after = sweep_runs(client, "interrupted")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert {run.info.run_id for run in children_after} == {run.info.run_id for run in children}  # resumed in place
    assert_each_trained_once(client, children_after, epochs=10)
    for log in logs_of(tmp_path, parent.info.run_id):  # each child's log: its first part, then its resume
        assert "mlexp: resuming run" in log.read_text(), log.read_text()[-4000:]


def test_bad_launch_options_are_one_line_exit_2_and_create_no_run(sqlite_uri, capsys, monkeypatch):
    cases = {
        ("--parallel", "0"): "--parallel must be at least 1",
        ("--gpus-per-run", "3"): "--gpus-per-run 3: this machine has no GPU(s)",
        ("--executor", "ray", "--ray-address", f"127.0.0.1:{free_closed_port()}"): "cannot reach the Ray cluster",
    }
    for extra, expected in cases.items():
        assert exit_status([*FOUR, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed: `import ray` fails, as without mlexp[ray]
    assert exit_status([*FOUR, "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mlexp[ray]'" in err and err.count("\n") == 1
    assert not runs_of(MlflowClient(sqlite_uri), "mlexp")


def exit_status(args: list[str]) -> int:
    """`mlexp ARGS` in this process (as the console script runs it): its exit status."""
    from mlexp.commands.cli import main

    try:
        main(args)
    except SystemExit as done:
        return done.code or 0
    return 0


def free_closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logs_of(tmp_path: Path, parent_id: str) -> list[Path]:
    return sorted((tmp_path / "mlexp-output" / "sweeps" / parent_id).glob("*.log"))


@pytest.mark.slow
def test_retry_failed_trains_a_failed_configuration_again_in_its_own_run(server_uri, tmp_path, capsys):
    from tests.helpers import write_pretrained_weights

    weights = tmp_path / "weights" / "test_resnet.safetensors"  # not there yet: the configuration fails
    args = ["sweep", "--backbones", "test_resnet", "--inits", "pretrained", "--weights", str(weights),
            "--data", "digits", "--img-size", "16", "--epochs", "1", "--calibrate", "false", "--experiment", "retry"]
    client = MlflowClient(server_uri)
    assert exit_status(args) == 1  # the launcher in this process, its children in their own
    assert "] FAILED test_resnet_pretrained-full-s42: " in capsys.readouterr().out
    _, [child] = sweep_runs(client, "retry")
    assert child.info.status == "FAILED" and str(weights) in child.data.tags["mlexp.error"]

    assert exit_status(args) == 1  # a FAILED configuration is not retrained unless asked
    again = capsys.readouterr().out
    assert "`--retry-failed` trains it again" in again and " started " not in again

    write_pretrained_weights(weights.parent, "test_resnet", "test_resnet")
    assert exit_status([*args, "--retry-failed"]) == 0, capsys.readouterr()
    parent, [after] = sweep_runs(client, "retry")
    assert after.info.run_id == child.info.run_id and after.info.status == "FINISHED"  # the same run
    assert "mlexp.error" not in after.data.tags and parent.info.status == "FINISHED"
    assert len(runs_of(client, "retry")) == 2
