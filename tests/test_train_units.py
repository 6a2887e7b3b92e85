"""Small pieces of the run: early stopping, the learning-rate schedule, loaders."""

from __future__ import annotations

import math

import pytest

from mlexp.config import TrainConfig
from mlexp.optim import lr_multiplier
from mlexp.records import History
from mlexp.train import early_stop


def history_with(val_accs: list[float]) -> History:
    history = History()
    for epoch, acc in enumerate(val_accs, start=1):
        history.add_epoch({"epoch": epoch, "val/acc": acc})
    return history


def test_early_stop_after_patience_epochs_without_a_better_val_acc():
    cfg = TrainConfig(early_stop_patience=2)
    history = history_with([0.5, 0.7, 0.69, 0.7])  # best at epoch 2; 0.7 again is not better
    assert not early_stop(cfg, history, 3)
    assert early_stop(cfg, history, 4)
    assert not early_stop(TrainConfig(early_stop_patience=0), history, 4)  # 0 = off


@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_schedule_warms_up_linearly_then_follows_the_schedule(scheduler):
    cfg = TrainConfig(scheduler=scheduler, epochs=10, warmup_epochs=2, step_size=3, gamma=0.5)
    f = lr_multiplier(cfg, steps_per_epoch=10)
    assert [f(s) for s in (0, 9, 19)] == pytest.approx([0.05, 0.5, 1.0])
    if scheduler == "cosine":
        assert f(20) == pytest.approx(1.0) and f(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))
    elif scheduler == "step":  # decays by gamma every step_size epochs (counted from the start)
        assert (f(29), f(30), f(60)) == pytest.approx((1.0, 0.5, 0.25))
    else:
        assert f(99) == 1.0
