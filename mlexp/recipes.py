"""Recipes: the init strategy (scratch adjustments) and, below it, presets of defaults."""

from __future__ import annotations

import math

from mlexp.backbones import BackboneSpec, resolve_backbone
from mlexp.config import TrainConfig
from mlexp.errors import MlexpError

# =========================================================================================
# Init strategy: pretrained vs scratch (seed 000)
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

    Apply it once, to the config the user asked for; the result is what gets logged (a resumed
    run reuses its logged effective config, it does not adjust again)."""
    effective = cfg.replace(backbone=spec.name, init=spec.init)
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
    return apply_init_adjustments(cfg, resolve_backbone(cfg.backbone, cfg.init))


def init_flavours(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The effective configs of cfg's arch for each init it supports ({"pretrained": ..., "scratch": ...};
    mlexp's own ViTs only have "scratch")."""
    asked = resolve_backbone(cfg.backbone, cfg.init)
    flavours = {}
    for init in ("pretrained", "scratch"):
        try:
            spec = asked if init == asked.init else resolve_backbone(asked.arch, init)
        except MlexpError:
            continue
        flavours[init] = apply_init_adjustments(cfg, spec)
    return flavours


_COMPARED = (("lr", "lr"), ("epochs", "epochs"), ("warmup_epochs", "warmup epochs"),
             ("weight_decay", "weight decay"))


def _show(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_init_comparison(cfgs: list[TrainConfig]) -> str:
    """Seed 000's dry-run "Configuration Comparison": per arch, pretrained vs scratch values.

    Takes the configs as the user asked for them (before adjustment); both flavours are shown
    for every arch that has both, even if only one was requested."""
    lines = ["Configuration comparison (pretrained vs scratch)", "=" * 60]
    seen = set()
    for cfg in cfgs:
        flavours = init_flavours(cfg)
        arch = resolve_backbone(cfg.backbone, cfg.init).arch
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
    """Seed 000's numbered "Training Plan", one line per run, from effective configs."""
    width = max((len(c.backbone) for c in effective_cfgs), default=0)
    lines = [f"Training plan ({len(effective_cfgs)} run{'s' if len(effective_cfgs) != 1 else ''}):"]
    for number, cfg in enumerate(effective_cfgs, 1):
        init = f"({cfg.init})"
        lines.append(f"  {number}. {cfg.backbone:<{width}}  {init:<12}  {cfg.epochs} epochs, lr={_show(cfg.lr)}")
    return "\n".join(lines)


# =========================================================================================
# Recipe presets (--recipe) go below this line.
# =========================================================================================
