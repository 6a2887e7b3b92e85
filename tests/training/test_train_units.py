"""Small pieces of the run: early stopping, the learning-rate schedule, loaders."""

from __future__ import annotations

import math

import pytest

from mlexp.config import TrainConfig
from mlexp.training.optimizer import lr_multiplier
from mlexp.training.parts import early_stop
from mlexp.training.records import History


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


def test_test_split_is_held_out_first_disjoint_and_the_same_for_every_seed_and_fold():
    from mlexp.config import TrainConfig
    from mlexp.data.images import digits_arrays
    from mlexp.data.sources import build_data

    images = digits_arrays()[0]
    keys = {image.tobytes(): index for index, image in enumerate(images)}
    assert len(keys) > 1700  # digits images are (nearly all) distinct, so they identify themselves

    def indices(dataset) -> set[int]:
        return {keys[image.tobytes()] for image in dataset.images}

    splits = []
    for seed, folds, fold in ((1, 0, 0), (2, 0, 0), (1, 3, 0), (1, 3, 2)):
        data = build_data(TrainConfig(data="digits", test_split=0.2, seed=seed, folds=folds, fold=fold))
        test, train, val = indices(data.test_set), indices(data.train_set), indices(data.val_set)
        assert not test & train and not test & val and not train & val
        assert len(data.test_set) == 360  # ceil(0.2 x 1,797)
        splits.append(test)
    assert all(test == splits[0] for test in splits)  # one test set for every seed and fold
    assert build_data(TrainConfig(data="digits")).test_set is None


def test_end_of_run_report_by_hand(tmp_path):
    import pandas as pd
    import torch

    from mlexp.training.evaluation import split_metrics, write_report
    from mlexp.training.loop import EvalResult

    # 6 classes, 6 images: classes 0-4 right, the class-5 image predicted as class 0
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits = torch.eye(6)[[0, 1, 2, 3, 4, 0]] * 5 + torch.arange(6) * 0.1  # class 5 second for the last image
    result = EvalResult(loss=0.5, acc=5 / 6, logits=logits, labels=labels)
    metrics = split_metrics(result)
    assert metrics["balanced_acc"] == pytest.approx(5 / 6)  # recall 1 for five classes, 0 for one
    assert metrics["macro_f1"] == pytest.approx((4 * 1 + 2 / 3 + 0) / 6)  # class 0: precision 1/2, recall 1
    assert metrics["top5"] == 1.0
    files = write_report(result, [f"c{i}" for i in range(6)], tmp_path)
    table = pd.read_csv(files[0])
    assert table["support"].tolist() == [1] * 6 and table.loc[5, "recall"] == 0
    confusion = pd.read_csv(files[1], index_col=0)
    assert confusion.loc["c5", "c0"] == 1 and int(confusion.values.sum()) == 6
    assert files[2].read_bytes()[:4] == b"\x89PNG"
