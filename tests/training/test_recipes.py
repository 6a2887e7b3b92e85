"""Init strategy: scratch multipliers, the effective config, and the dry-run comparison/plan text."""

from __future__ import annotations

import pytest

from mlexp.config import TrainConfig
from mlexp.models.catalogue import resolve_backbone
from mlexp.training.recipes import (
    apply_init_adjustments,
    effective_config,
    format_init_comparison,
    format_training_plan,
    init_flavours,
)

BASE = TrainConfig(backbone="resnet50", lr=1e-4, epochs=50, warmup_epochs=2.0, weight_decay=0.05)


def test_scratch_gets_the_scratch_multipliers():
    cfg = BASE.replace(backbone="resnet50_scratch")
    effective = apply_init_adjustments(cfg, resolve_backbone(cfg.backbone, cfg.init))
    assert (effective.backbone, effective.init) == ("resnet50_scratch", "scratch")
    assert effective.lr == 0.00015  # 1.5x, tidied (not 0.00015000000000000001)
    assert effective.epochs == 60  # 1.2x
    assert effective.warmup_epochs == 3.0  # 1.5x
    assert effective.weight_decay == 0.04  # 0.8x
    assert effective.replace(lr=BASE.lr, epochs=50, warmup_epochs=2.0, weight_decay=0.05,
                             backbone="resnet50", init="auto") == BASE  # nothing else changed


def test_pretrained_is_unchanged_but_alias_and_init_resolved():
    effective = effective_config(BASE)
    assert (effective.backbone, effective.init) == ("resnet50_pretrained", "pretrained")
    assert effective.replace(backbone="resnet50", init="auto") == BASE
    assert effective.to_params()["backbone"] == "resnet50_pretrained"


def test_init_flag_on_alias_picks_the_scratch_entry_and_multipliers_are_config():
    cfg = BASE.replace(init="scratch", scratch_lr_mult=2.0, epochs=1)
    effective = effective_config(cfg)
    assert effective.backbone == "resnet50_scratch" and effective.lr == 2e-4
    assert effective.epochs == 1  # round(1.2) = 1, never 0


@pytest.mark.parametrize("epochs, expected", [(1, 1), (3, 4), (5, 6), (10, 12), (50, 60)])
def test_scratch_epochs_round(epochs, expected):
    assert effective_config(BASE.replace(backbone="vit_small", epochs=epochs)).epochs == expected


def test_comparison_shows_both_flavours_even_if_one_was_asked():
    text = format_init_comparison([BASE, BASE.replace(backbone="vit_small")])
    assert "RESNET50:" in text and "VIT_SMALL:  (scratch only)" in text
    assert "lr            : pretrained=0.0001     | scratch=0.00015" in text
    assert "epochs        : pretrained=50         | scratch=60" in text
    assert "warmup epochs : pretrained=2          | scratch=3" in text
    assert "weight decay  : pretrained=0.05       | scratch=0.04" in text
    assert "pretrained=-" in text  # vit_small has no pretrained flavour
    assert text.isascii()
    # Asking for both flavours of one arch shows it once.
    assert format_init_comparison([BASE, BASE.replace(init="scratch")]).count("RESNET50") == 1


def test_training_plan_lines():
    flavours = init_flavours(BASE)
    text = format_training_plan(list(flavours.values()))
    assert text.splitlines() == [
        "Training plan (2 runs):",
        "  1. resnet50_pretrained  (pretrained)  50 epochs, lr=0.0001",
        "  2. resnet50_scratch     (scratch)     60 epochs, lr=0.00015",
    ]
