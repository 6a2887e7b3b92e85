"""A sweep's per-strategy and per-init epochs and learning rates: the plan's effective configs,
the printed plan, each child's options (the same config hash as the plan's) and the parent's
params; bad specs stop the sweep with one line before anything starts."""

from __future__ import annotations

import re

import pytest

from mlexp.commands.cli import main
from mlexp.config import TrainConfig, config_hash
from mlexp.sweep.overrides import Overrides
from mlexp.sweep.plan import INITS, expand_grid, grid_params
from mlexp.training.recipes import config_from_user_values, effective_config
from tests.commands.test_user_errors import assert_one_line_error, run_cli

GIVEN = {"strategy_epochs": ("linear=15", "full=30"), "strategy_lr": ("linear=0.01", "full=0.001"),
         "init_epochs": ("scratch=20",), "init_lr": ()}


def test_plan_rows_hold_the_effective_values():
    base = TrainConfig(epochs=5, lr=0.0005, scratch_epochs_mult=2.0, scratch_lr_mult=3.0)
    overrides = Overrides.parse(GIVEN, ["linear", "full"], INITS)
    rows = expand_grid(base, ["resnet18"], list(INITS), ["linear", "full"], [1, 2], [0], overrides)
    effective = {(row.effective.init, row.effective.strategy, row.effective.seed): row.effective for row in rows}
    assert len(rows) == 8
    for seed in (1, 2):
        assert (effective["pretrained", "linear", seed].epochs, effective["pretrained", "linear", seed].lr) == (15, 0.01)
        assert (effective["pretrained", "full", seed].epochs, effective["pretrained", "full", seed].lr) == (30, 0.001)
        # scratch: --init-epochs is what it trains for; the strategy's lr still gets the scratch multiplier
        assert (effective["scratch", "linear", seed].epochs, effective["scratch", "linear", seed].lr) == (20, 0.03)
        assert (effective["scratch", "full", seed].epochs, effective["scratch", "full", seed].lr) == (20, 0.003)
    scratch_full = next(row for row in rows if row.effective.init == "scratch" and row.effective.strategy == "full")
    assert scratch_full.overridden == {"epochs": "20", "lr": "0.001", "scratch_epochs_mult": "1.0"}
    for row in rows:  # the child builds the same config from its options: the same hash, the plan's values
        args = row.train_args({"epochs": "5", "lr": "0.0005", "scratch_epochs_mult": "2", "scratch_lr_mult": "3"})
        options = {name[2:].replace("-", "_"): value for name, value in zip(args[::2], args[1::2])}
        child = effective_config(config_from_user_values(options))
        assert (config_hash(child), child.epochs, child.lr) == (row.config_hash, row.effective.epochs,
                                                               row.effective.lr)
    params = grid_params(["resnet18"], list(INITS), ["linear", "full"], [1, 2], [0], rows, overrides)
    assert params["sweep.strategy_epochs"] == "linear=15,full=30" and params["sweep.init_epochs"] == "scratch=20"
    assert "sweep.init_lr" not in params  # not given


def test_dry_run_prints_each_strategy_s_epochs(sqlite_uri, capsys):
    main(["sweep", "--backbones", "resnet18", "--strategies", "linear", "full", "--strategy-epochs", "linear=15",
          "full=30", "--strategy-lr", "linear=0.01,full=0.001", "--init-epochs", "scratch=20", "--init-lr",
          "scratch=0.002", "--seeds", "1,2", "--dry-run"])
    plan = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert len(plan) == 8
    values = [(line.split()[1], line.split()[2], re.search(r"epochs=(\d+)\s+lr=(\S+)", line).groups())
              for line in plan]
    assert {(name, strategy, numbers) for name, strategy, numbers in values} == {
        ("resnet18_pretrained", "linear", ("15", "0.01")), ("resnet18_pretrained", "full", ("30", "0.001")),
        ("resnet18_scratch", "linear", ("20", "0.002")), ("resnet18_scratch", "full", ("20", "0.002"))}


@pytest.mark.parametrize("args, fragments", [
    (["--strategy-epochs", "lineer=15"], ["--strategy-epochs 'lineer=15'", "not one of the sweep's strategies",
                                          "linear, full"]),
    (["--strategy-epochs", "gradual=15"], ["'gradual' is not one of the sweep's strategies"]),
    (["--init-epochs", "scrach=20"], ["'scrach' is not one of the sweep's inits: pretrained, scratch"]),
    (["--strategy-lr", "linear=fast"], ["--strategy-lr 'linear=fast': 'fast' is not a number"]),
    (["--init-epochs", "scratch=2.5"], ["'2.5' is not a whole number"]),
    (["--strategy-epochs", "linear"], ["expected NAME=VALUE"]),
    (["--strategy-epochs", "=15"], ["expected NAME=VALUE"]),
    (["--init-lr", "scratch=0"], ["must be positive"]),
    (["--strategy-epochs", "full=3,full=4"], ["full is given twice"]),
])
def test_bad_override_specs_are_one_line(args, fragments, sqlite_uri, capsys):
    code, err = run_cli(["sweep", "--backbones", "resnet18", "--strategies", "linear,full", *args], capsys)
    assert_one_line_error(code, err, *fragments)
