"""`mlexp tune --dry-run`: the arms, the space, the equal budgets, the worst-case cost and how
many trials train at once, before anything is created."""

from __future__ import annotations

import pytest

from mlexp.commands.cli import main


def test_a_dry_run_says_the_plan_and_its_worst_case_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["tune", "--backbones", "test_resnet", "--space", "lr=1e-4:1e-1:log,weight_decay=0:0.1", "--trials", "4",
          "--epochs", "2", "--final-seeds", "1,2", "--parallel", "2", "--data", "digits", "--dry-run",
          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    said = capsys.readouterr().out
    assert "2 arm(s), each 4 trial(s) of 2 epoch(s)" in said
    assert "arms: test_resnet_pretrained-full, test_resnet_scratch-full" in said
    assert "space: lr in [0.0001, 0.1] (log); weight_decay in [0, 0.1]" in said
    # (4 trials + 2 final seeds) x 2 epochs per arm, two arms
    assert "worst case (no trial pruned): 24 epochs in all, 12 per arm (equal budgets)" in said
    assert "trials at once: 2, as worker processes on this machine" in said
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlexp-output").exists()


def test_worker_sizes_without_workers_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["tune", "--backbones", "test_resnet", "--space", "lr=1e-4:1e-1:log", "--cpus-per-run", "1",
              "--data", "digits", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.startswith("mlexp: error: --cpus-per-run and --gpus-per-run size the "
                                                   "workers of --parallel N") and "\n" not in err
