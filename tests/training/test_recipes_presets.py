"""Recipe presets: defaults, explicit values win, the pretrain LR scaling rule."""

from __future__ import annotations

import pytest

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.training.recipes import PRESETS, config_from_user_values, preset_rows


def test_pretrain_preset_is_the_modern_from_scratch_recipe():
    cfg = config_from_user_values({"recipe": "pretrain"})
    assert (cfg.recipe, cfg.optimizer, cfg.scheduler) == ("pretrain", "sgd", "cosine")
    assert (cfg.weight_decay, cfg.warmup_epochs, cfg.label_smoothing) == (1e-4, 5.0, 0.1)
    assert (cfg.mixup, cfg.cutmix, cfg.aa, cfg.hflip) == (0.2, 1.0, "rand-m9-n2-mstd0.5", 0.5)
    assert cfg.lr == pytest.approx(0.1 * 32 / 256)   # default batch 32, one process
    assert cfg.llrd_decay == 1.0 and cfg.scratch_lr_mult == 1.0   # a scratch recipe: no multipliers stacked


@pytest.mark.parametrize("values, world_size, lr", [
    ({"batch_size": "64"}, 1, 0.025),
    ({"batch_size": "64"}, 4, 0.1),
    ({"batch_size": 128, "grad_accum": "2"}, 2, 0.2),
    ({"batch_size": "256", "lr": "0.05"}, 8, 0.05),   # an explicit lr is never rescaled
])
def test_pretrain_lr_scales_with_the_global_batch(values, world_size, lr):
    cfg = config_from_user_values({"recipe": "pretrain", **values}, world_size=world_size)
    assert cfg.lr == pytest.approx(lr)


def test_finetune_preset_and_explicit_values_win():
    cfg = config_from_user_values({"recipe": "finetune"})
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 1e-4, 0.05, 1.0)
    assert (cfg.strategy, cfg.llrd_decay, cfg.ema, cfg.label_smoothing, cfg.hflip) == ("full", 0.8, True, 0.1, 0.5)
    cfg = config_from_user_values({"recipe": "finetune", "lr": "3e-4", "ema": "false", "strategy": "gradual",
                                   "backbone": "vit_small", "epochs": 7})
    assert (cfg.lr, cfg.ema, cfg.strategy, cfg.backbone, cfg.epochs) == (3e-4, False, "gradual", "vit_small", 7)
    assert cfg.llrd_decay == 0.8   # untouched preset values stay


def test_no_recipe_means_plain_defaults():
    assert config_from_user_values({}) == TrainConfig()
    assert config_from_user_values({"recipe": "", "lr": "0.01"}) == TrainConfig(lr=0.01)


def test_unknown_recipe_and_bad_values_are_user_errors():
    with pytest.raises(MlexpError, match="finetune.*pretrain|pretrain.*finetune"):
        config_from_user_values({"recipe": "imagenet"})
    with pytest.raises(MlexpError, match="batch-size"):
        config_from_user_values({"recipe": "pretrain", "batch_size": "many"})
    with pytest.raises(MlexpError, match="unknown option"):
        config_from_user_values({"recipe": "finetune", "learning_rate": "1"})


def test_every_preset_is_valid_and_listed():
    names = [row["recipe"] for row in preset_rows()]
    assert names == list(PRESETS) and {"finetune", "pretrain"} <= set(names)
    for name in PRESETS:
        assert config_from_user_values({"recipe": name}).recipe == name
    pretrain_row = next(row for row in preset_rows() if row["recipe"] == "pretrain")
    assert "lr=0.1*global_batch/256" in pretrain_row["settings"]
