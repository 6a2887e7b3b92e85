"""The parts of one run around its model: the Accelerator, loaders, loss, mixup, optimizer,
schedule, fine-tuning strategy and EMA, and which weights evaluate and get saved."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from mlexp.config import TrainConfig
from mlexp.data.loading import EpochSeeded, loader_kwargs
from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec
from mlexp.models.strategies import build_strategy
from mlexp.option_values import BUILT_IN
from mlexp.tasks.kinds import Task
from mlexp.training import hardware
from mlexp.training.loop import TrainParts
from mlexp.training.optimizer import build_optimizer, build_scheduler
from mlexp.training.records import History


def build_parts(cfg: TrainConfig, spec: BackboneSpec, model: torch.nn.Module, data, accelerator: Accelerator,
                task: Task) -> tuple[TrainParts, DataLoader, DataLoader]:
    """Strategy, optimizer, loaders, schedule and EMA around the task's model."""
    strategy = build_strategy(model, spec.family, cfg)
    channels_last = hardware.choose_channels_last(cfg.channels_last, accelerator.device.type,
                                                  hardware.is_convolutional(model), spec.family)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(strategy.param_groups(cfg.weight_decay), cfg, accelerator.device.type)
    workers = hardware.worker_count(cfg, built_in=cfg.data in BUILT_IN)
    train_loader, val_loader = make_loaders(data, cfg, accelerator.num_processes, workers, task.collate)
    module = model  # wrappers below share its parameters; it is what gets saved and loaded
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    # Not prepared by Accelerate: its wrapper steps the schedule once per process per step.
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    parts = TrainParts(accelerator, model, optimizer, scheduler, make_loss(cfg), task, strategy, module,
                       mixup=make_mixup(cfg, data.num_classes), clip_grad=cfg.clip_grad,
                       channels_last=channels_last, workers=workers)
    if cfg.ema:
        # Warmup (decay ramps up from 0) so that short runs do not evaluate mostly-initial weights.
        parts.ema = ModelEmaV3(module, decay=cfg.ema_decay, use_warmup=True)
    return parts, train_loader, val_loader


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    cpu = not torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and cpu:
        raise MlexpError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    hardware.configure_cuda()
    hardware.keep_freed_memory()
    # cpu=True is what makes torchrun/accelerate launch on a CPU-only machine use DDP over gloo
    # (MULTI_CPU); without it each process silently trains alone. Pinned batches are copied
    # to the GPU without blocking, so the copy overlaps the previous step's compute.
    return Accelerator(cpu=cpu, mixed_precision=hardware.device_precision(cfg.mixed_precision),
                       gradient_accumulation_steps=cfg.grad_accum,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=not cpu))


def release_accelerator(accelerator: Accelerator) -> None:
    """The run's end for Accelerate (its trackers, if any). Its state is process-wide: one
    process trains one run (a sweep starts a process per child), so it is not reset here."""
    accelerator.end_training()


def make_loaders(data, cfg: TrainConfig, num_processes: int, workers: int,
                 collate=None) -> tuple[DataLoader, DataLoader]:
    # Drop the ragged last batch when a full one exists: mixup needs even batches and
    # BatchNorm cannot train on a batch of one.
    drop_last = len(data.train_set) >= cfg.batch_size * num_processes
    train = DataLoader(EpochSeeded(data.train_set, cfg.seed), shuffle=True, drop_last=drop_last,
                       collate_fn=collate, **loader_kwargs(cfg, workers))
    val = DataLoader(data.val_set, shuffle=False, collate_fn=collate, **loader_kwargs(cfg, workers))
    if len(train) == 0:
        raise MlexpError(f"the training set ({len(data.train_set)} images) is smaller than one batch; "
                         "lower --batch-size")
    return train, val


def make_loss(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()  # mixup produces (smoothed) soft targets
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def make_mixup(cfg: TrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def eval_model(parts: TrainParts) -> torch.nn.Module:
    """The EMA weights when EMA is on (they are what gets evaluated and checkpointed)."""
    return parts.ema.module if parts.ema is not None else parts.model


def final_weights_model(parts: TrainParts) -> torch.nn.Module:
    """The plain module behind eval_model: what `final/` holds and TrainResult returns."""
    return parts.ema.module if parts.ema is not None else parts.module


def early_stop(cfg: TrainConfig, history: History, epoch: int) -> bool:
    return cfg.early_stop_patience > 0 and epoch - history.best_epoch >= cfg.early_stop_patience
