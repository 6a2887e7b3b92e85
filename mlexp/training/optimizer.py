"""Optimizer and learning-rate schedule factories.

Every schedule mlexp offers is a `LambdaLR`: one multiplier per optimizer step, applied to
each parameter group's *own* starting learning rate. Layer-wise LR decay works by giving
each group a scaled starting LR (`lr_scale`), so it survives every schedule. (timm's
`param_groups_layer_decay` only stores `lr_scale` and relies on timm's schedulers to apply
it; with any other scheduler it silently does nothing. Here the scale is baked in.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from mlexp.config import TrainConfig

# Devices with torch's fused AdamW/SGD kernels: one pass over each parameter instead of a
# dozen elementwise ops. On CPU (resnet18, 2 threads) an AdamW step takes 6 ms fused against
# 38 ms unfused (torch's default off CUDA): ~5% of a 128 px training step.
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """An optimizer whose groups start at `cfg.lr * group['lr_scale']`, fused where the
    training device has the kernels (the same update, up to float rounding)."""
    fused = device_type in FUSED_DEVICES
    groups = []
    for group in param_groups:
        if not group["params"]:
            continue
        scale = group.get("lr_scale", 1.0)
        groups.append({**group, "lr": cfg.lr * scale, "lr_scale": scale})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def lr_multiplier(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule as a function of the optimizer step (0-based): warmup, then the decay."""
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cfg.scheduler == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.scheduler == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
        return 1.0

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Stepped once per optimizer step (not per epoch), so warmup is smooth on small data."""
    return LambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch))
