"""An outbox on a disk too small for it: the run ends FAILED on the server with the cause, one
line is printed, exit status 1 (a real tmpfs of 1 MiB; mounting one needs root, as CI runs)."""

from __future__ import annotations

import os
import subprocess

import pytest
from mlflow import MlflowClient

from tests.faults import TINY
from tests.helpers import run_mlexp, runs_of, subprocess_env


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_outbox_disk_fails_the_run_with_its_cause(sqlite_uri, tmp_path, small_disk):
    done = run_mlexp(["train", *TINY, "--epochs", "2", "--log-models", "false", "--system-metrics", "false",
                      "--experiment", "full"], subprocess_env(sqlite_uri, MLEXP_OUTBOX_DIR=str(small_disk / "outbox")),
                     tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(lines) == 1 and "its outbox cannot be written" in lines[0] and "Traceback" not in done.stderr
    [run] = runs_of(MlflowClient(sqlite_uri), "full")
    assert run.info.status == "FAILED"
    cause = run.data.tags["mlexp.error"]  # SQLite's words, or the checkpoint writer's, whichever hit the wall first
    assert "cannot be written" in cause and ("disk is full" in cause or "No space left" in cause), cause


def test_a_checkpoint_too_large_for_its_disk_says_the_disk_is_full(small_disk):
    """torch.save reports a short write without its cause ("unexpected pos ..."); the checkpoint
    writer raises the OS's own error instead, which a run turns into its one line."""
    import errno

    import torch

    from mlexp.tracking.outbox import outbox_unwritable
    from mlexp.training.checkpoints import save_training_state

    with pytest.raises(OSError) as raised:
        save_training_state(small_disk / "checkpoint", {"w": torch.zeros(1)}, {"optimizer": torch.zeros(1_000_000)})
    assert raised.value.errno == errno.ENOSPC and outbox_unwritable(raised.value)
