"""Recipes: the init strategy (scratch adjustments) and, below it, presets of defaults."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import get_type_hints

from mlexp.config import TrainConfig, parse_value
from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec, resolve_backbone

# =========================================================================================
# Init strategy: pretrained vs scratch
#
# A network trained from random weights needs a higher learning rate, more epochs, a longer
# warmup and less weight decay than one fine-tuned from pretrained weights. The multipliers
# are config fields (scratch_*_mult), so they are logged and can be changed per run.
# =========================================================================================


def _tidy(value: float) -> float:
    """0.0001 * 1.5 is 0.00015000000000000001; log 0.00015."""
    return float(f"{value:.12g}")


def apply_init_adjustments(cfg: TrainConfig, spec: BackboneSpec) -> TrainConfig:
    """The effective config: backbone resolved (alias -> catalogue name), init explicit, and for
    scratch runs lr, epochs, warmup and weight decay scaled by the scratch multipliers.

    Another task's run (a detector's, a user's own) chooses its best epoch by its task's primary
    metric (a detector's val/map) unless --best-metric says otherwise.
    Apply it once, to the config the user asked for; the result is what gets logged (a resumed
    run reuses its logged effective config, it does not adjust again)."""
    effective = cfg.replace(backbone=spec.plugin or spec.name, init=spec.init)
    if cfg.task != "classification" and cfg.best_metric == "val/acc":  # the option's default: the task's own metric
        from mlexp.tasks.kinds import task_of  # here: `mlexp --help` reads the recipes, and tasks load torch

        task = task_of(cfg)
        effective = effective.replace(best_metric=task.primary_metric)
        if cfg.best_mode == "auto" and hasattr(task, "higher_is_better"):  # its say, over the metric name's
            effective = effective.replace(best_mode="max" if task.higher_is_better else "min")
    if spec.init != "scratch":
        return effective
    return effective.replace(
        lr=_tidy(cfg.lr * cfg.scratch_lr_mult),
        epochs=max(1, math.floor(cfg.epochs * cfg.scratch_epochs_mult + 0.5)),
        warmup_epochs=_tidy(cfg.warmup_epochs * cfg.scratch_warmup_mult),
        weight_decay=_tidy(cfg.weight_decay * cfg.scratch_wd_mult),
    )


def effective_config(cfg: TrainConfig) -> TrainConfig:
    """resolve_backbone + apply_init_adjustments for a user config."""
    return apply_init_adjustments(cfg, resolve_backbone(cfg.backbone, cfg.init, cfg.plugins))


def init_flavours(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The effective configs of cfg's arch for each init it supports ({"pretrained": ..., "scratch": ...};
    mlexp's own ViTs only have "scratch")."""
    asked = resolve_backbone(cfg.backbone, cfg.init, cfg.plugins)
    flavours = {}
    for init in ("pretrained", "scratch"):
        try:
            spec = asked if init == asked.init else resolve_backbone(asked.plugin or asked.arch, init, cfg.plugins)
        except MlexpError:
            continue
        flavours[init] = apply_init_adjustments(cfg, spec)
    return flavours


_COMPARED = (("lr", "lr"), ("epochs", "epochs"), ("warmup_epochs", "warmup epochs"),
             ("weight_decay", "weight decay"))


def _show(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_init_comparison(cfgs: list[TrainConfig]) -> str:
    """The dry run's "Configuration Comparison": per arch, pretrained vs scratch values.

    Takes the configs as the user asked for them (before adjustment); both flavours are shown
    for every arch that has both, even if only one was requested."""
    lines = ["Configuration comparison (pretrained vs scratch)", "=" * 60]
    seen = set()
    for cfg in cfgs:
        flavours = init_flavours(cfg)
        arch = resolve_backbone(cfg.backbone, cfg.init, cfg.plugins).arch
        key = (arch, *(getattr(f, name) for f in flavours.values() for name, _ in _COMPARED))
        if key in seen:
            continue
        seen.add(key)
        only = "" if len(flavours) == 2 else f"  ({next(iter(flavours))} only)"
        lines += ["", f"{arch.upper()}:{only}"]
        for name, title in _COMPARED:
            pre = _show(getattr(flavours["pretrained"], name)) if "pretrained" in flavours else "-"
            scr = _show(getattr(flavours["scratch"], name)) if "scratch" in flavours else "-"
            lines.append(f"  {title:<14}: pretrained={pre:<10} | scratch={scr}")
    return "\n".join(lines)


def format_training_plan(effective_cfgs: list[TrainConfig]) -> str:
    """The dry run's numbered "Training Plan", one line per run, from effective configs."""
    width = max((len(c.backbone) for c in effective_cfgs), default=0)
    lines = [f"Training plan ({len(effective_cfgs)} run{'s' if len(effective_cfgs) != 1 else ''}):"]
    for number, cfg in enumerate(effective_cfgs, 1):
        init = f"({cfg.init})"
        lines.append(f"  {number}. {cfg.backbone:<{width}}  {init:<12}  {cfg.epochs} epochs, lr={_show(cfg.lr)}")
    return "\n".join(lines)


# =========================================================================================
# Recipe presets (--recipe) go below this line.
# =========================================================================================


# =========================================================================================
# PRESETS (--recipe NAME): named sets of defaults. Explicit options always win.
#
# Recipe presets (--recipe): defaults a run starts from; explicit options win.
# A preset only holds TrainConfig fields; the pretrain learning rate is a rule, not a value
# (linear scaling with the global batch, see LR_PER_256), so it lives in LR_PER_256.
# =========================================================================================

PRESETS: dict[str, dict[str, object]] = {
    # A modern from-scratch recipe (timm-style ResNet training): SGD + nesterov,
    # lr 0.1 per 256 images of global batch, 5 warmup epochs, cosine, label smoothing 0.1,
    # mixup 0.2, cutmix 1.0, RandAugment n2 m9, flips. The recipe is already tuned for random
    # init, so the scratch multipliers are neutralised (1.0) rather than stacked on top.
    # Epochs are left to the user (300-600 for ImageNet pretraining; mlexp's default is a smoke test).
    "pretrain": {
        "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "scheduler": "cosine",
        "warmup_epochs": 5.0, "label_smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0,
        "aa": "rand-m9-n2-mstd0.5", "hflip": 0.5, "strategy": "full", "llrd_decay": 1.0,
        "scratch_lr_mult": 1.0, "scratch_epochs_mult": 1.0, "scratch_warmup_mult": 1.0,
        "scratch_wd_mult": 1.0,
    },
    # Full fine-tuning of a pretrained backbone (BEiT/MAE/DeiT-style, toned down for small
    # data): AdamW at 1e-4 with weight decay 0.05 is the standard transfer setting; layer-wise
    # decay 0.8 (a conservative value: the stem of a ViT-B still gets ~5% of the
    # head's LR, a ResNet's ~13%) keeps low-level filters close to their pretrained values;
    # 1 warmup epoch protects them from the randomly initialised head's first large gradients;
    # label smoothing 0.1 and flips are cheap regularisers that rarely hurt; mixup/cutmix and
    # RandAugment are left off (they need long schedules to pay off). EMA of the weights
    # smooths the noisy small-batch fine-tuning trajectory; decay 0.998 (~500-step horizon)
    # suits runs of a few thousand steps.
    "finetune": {
        "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "scheduler": "cosine",
        "warmup_epochs": 1.0, "label_smoothing": 0.1, "hflip": 0.5, "strategy": "full",
        "llrd_decay": 0.8, "ema": True, "ema_decay": 0.998, "calibrate": True,
    },
    # Linear probe: only the classifier trains, so a 10x higher LR and no weight
    # decay or label smoothing (they only blur the read-out of fixed features).
    "linear-probe": {
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine",
        "warmup_epochs": 0.0, "strategy": "linear", "linear_probe_epochs": 10, "hflip": 0.5,
        "calibrate": True,
    },
    # Gradual unfreezing: head, then the top of the network, then everything, each
    # phase after `gradual_patience` epochs without a lower val loss; the cosine schedule gives
    # the layers unfrozen later a smaller LR, in the spirit of ULMFiT's discriminative rates.
    "gradual-unfreeze": {
        "optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.05, "scheduler": "cosine",
        "warmup_epochs": 1.0, "label_smoothing": 0.1, "hflip": 0.5, "strategy": "gradual",
        "gradual_patience": 3, "calibrate": True,
    },
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "pretrain": "from-scratch pretraining (SGD, lr 0.1 x global batch/256, mixup/cutmix, RandAugment)",
    "finetune": "full fine-tuning with layer-wise LR decay 0.8, AdamW 1e-4, EMA",
    "linear-probe": "train only the classifier on frozen features",
    "gradual-unfreeze": "head -> top layers -> everything on val-loss plateaus",
}

# Presets whose lr follows the linear scaling rule: lr = LR_PER_256 * global_batch / 256,
# global_batch = batch_size * grad_accum * world_size. An explicit --lr wins.
LR_PER_256: dict[str, float] = {"pretrain": 0.1}


def _field_value(name: str, values: dict[str, object]) -> object:
    """A field's typed value from user/preset values, else its declared default."""
    raw = values.get(name)
    if raw is None or raw == "":
        return {f.name: f.default for f in fields(TrainConfig)}[name]
    return parse_value(name, get_type_hints(TrainConfig)[name], raw)


def config_from_user_values(values: dict[str, object], world_size: int = 1) -> TrainConfig:
    """The config from the options the user set explicitly, on top of their --recipe preset.

    `values` holds only explicit options (typed CLI options, non-empty MLproject -P values);
    text or typed. Precedence: explicit value > preset > TrainConfig default.
    """
    explicit = {name: value for name, value in values.items() if value is not None and value != ""}
    recipe = explicit.get("recipe")
    if recipe is None:
        return TrainConfig.from_strings(explicit)
    recipe = str(recipe).strip()
    if recipe not in PRESETS:
        raise MlexpError(f"unknown --recipe {recipe!r}; choose one of {', '.join(PRESETS)} "
                         "(see `mlexp recipes`)")
    merged: dict[str, object] = {**PRESETS[recipe], **explicit, "recipe": recipe}
    if recipe in LR_PER_256 and "lr" not in explicit:
        global_batch = (int(_field_value("batch_size", merged)) * int(_field_value("grad_accum", merged))
                        * max(1, int(world_size)))
        merged["lr"] = float(f"{LR_PER_256[recipe] * global_batch / 256:.12g}")
    return TrainConfig.from_strings(merged)


def preset_fields() -> set[str]:
    """The options some --recipe preset sets (and lr, which a preset may compute)."""
    return set().union(*PRESETS.values()) | ({"lr"} if LR_PER_256 else set())


def preset_rows() -> list[dict]:
    """One row per preset for `mlexp recipes`: name, what it is for, its settings."""
    rows = []
    for name, preset in PRESETS.items():
        settings = [f"{key}={value}" for key, value in preset.items()]
        if name in LR_PER_256:
            settings.insert(0, f"lr={LR_PER_256[name]:g}*global_batch/256")
        rows.append({"recipe": name, "description": PRESET_DESCRIPTIONS.get(name, ""),
                     "settings": " ".join(settings)})
    return rows
