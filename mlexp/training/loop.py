"""train_one_epoch and evaluate: the only forward/backward/step code in mlexp.

The loop returns plain floats and hands per-step records to a callback; it never
imports mlflow. Per-step losses stay on the device and are reduced across processes
every LOG_EVERY optimizer steps in one collective (a `.item()` per step would be a device
sync point, and an all-reduce per step a collective per step).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from mlexp.faults import crash_point

LOG_EVERY = 10
# Without a terminal (a log file, a pipe, a batch job) there is no bar: a progress line this often.
PROGRESS_EVERY_S = float(os.environ.get("MLEXP_PROGRESS_S", "30"))
_evaluations = 0  # evaluations run by this process (a fault-injection crash point counts them)


@dataclass
class StepRecord:
    """One optimizer step, as logged: `batch/loss`, `batch/lr`, `batch/samples_per_s`."""

    epoch: int
    batch: int  # optimizer step within the epoch, 1-based
    step: int  # global optimizer step, 1-based
    loss: float
    lr: float
    samples_per_s: float
    timestamp: float
    components: dict[str, float] = field(default_factory=dict)  # the loss's named parts (`batch/loss_<name>`)


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample
    loss_total: float  # sum of the per-step losses (the CSV's total_loss column)
    acc: float  # NaN for a task without class predictions (detection)
    steps: int
    samples: int
    time_s: float
    components: dict[str, float] = field(default_factory=dict)  # each loss component's mean per sample


@dataclass
class EvalResult:
    loss: float
    acc: float
    logits: torch.Tensor = field(repr=False)  # all validation logits (gathered), on CPU
    labels: torch.Tensor = field(repr=False)


@dataclass
class TrainParts:
    """What one training step needs; built once in train.py."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    task: object  # mlexp.tasks.kinds.Task: the model's loss, as a total and its components
    strategy: object  # finetune.Strategy: train_mode(), drop_frozen_grads()
    module: nn.Module | None = None  # the plain model (no DDP or compile wrapper): checkpoints, EMA
    mixup: Callable | None = None  # timm Mixup: (images, labels) -> (images, soft targets)
    ema: object | None = None  # timm ModelEmaV3
    clip_grad: float = 0.0
    channels_last: bool = False
    workers: int = 0  # DataLoader worker processes (--workers resolved)
    global_step: int = 0
    best_weights: dict | None = None  # a CPU copy of the best epoch's weights, kept when there is a test set


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group learning rate (the head's, under layer-wise decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


class Progress:
    """Long work is never silent: a bar on a terminal (main process only); without one (a log
    file, a pipe, a batch job), a line every PROGRESS_EVERY_S with step, loss and samples/s."""

    def __init__(self, loader, accelerator: Accelerator, description: str) -> None:
        quiet = not accelerator.is_main_process or bool(os.environ.get("TQDM_DISABLE"))
        # disable=None: tqdm hides the bar itself when the output is not a terminal
        self.bar = tqdm(loader, desc=description, leave=False, unit="batch", disable=True if quiet else None)
        self.lines = accelerator.is_main_process and self.bar.disable
        self.description = description
        self.steps = len(loader) // accelerator.gradient_accumulation_steps
        self.last_line = time.perf_counter()

    def show(self, record: StepRecord) -> None:
        self.bar.set_postfix(loss=f"{record.loss:.4f}", samples_per_s=f"{record.samples_per_s:.0f}")
        if self.lines and time.perf_counter() - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = time.perf_counter()
            print(f"  {self.description}: step {record.batch}/{self.steps}  loss {record.loss:.4f}  "
                  f"{record.samples_per_s:.0f} samples/s", flush=True)


def train_one_epoch(parts: TrainParts, loader, epoch: int, on_steps: Callable[[list[StepRecord]], None],
                    description: str = "") -> EpochStats:
    accelerator = parts.accelerator
    parts.strategy.train_mode(parts.model)
    names = parts.task.components
    # [total loss, each component] summed over samples, and over the optimizer step's micro-batches
    loss_sums, step_losses = (torch.zeros(1 + len(names), device=accelerator.device) for _ in range(2))
    correct, seen = (torch.zeros((), device=accelerator.device) for _ in range(2))
    pending: list[tuple[torch.Tensor, int, float, float, float]] = []  # losses, batch, lr, samples/s, wall time
    records: list[StepRecord] = []
    global_batch = 0
    epoch_start = last_step_time = time.perf_counter()
    progress = Progress(loader, accelerator, description or f"epoch {epoch}")

    def report() -> None:
        if not pending:
            return
        # one collective for every pending step's loss and components
        rows = accelerator.reduce(torch.stack([p[0] for p in pending]), reduction="mean").tolist()
        new = [StepRecord(epoch, batch, parts.global_step - len(pending) + i + 1, row[0], lr, rate, wall,
                          dict(zip(names, row[1:])))
               for i, (row, (_, batch, lr, rate, wall)) in enumerate(zip(rows, pending))]
        pending.clear()
        records.extend(new)
        on_steps(new)
        progress.show(new[-1])

    for images, labels in progress.bar:
        losses, logits = forward_backward(parts, images, labels)
        batch_size = images.shape[0]
        loss_sums += losses * batch_size
        if logits is not None:
            correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += batch_size
        step_losses += losses / accelerator.gradient_accumulation_steps
        global_batch += batch_size * accelerator.num_processes
        if accelerator.sync_gradients:
            lr = current_lr(parts.optimizer)  # the lr this step used, before the schedule moves on
            parts.scheduler.step()
            if parts.ema is not None:
                parts.ema.update(parts.module, step=parts.global_step)
            parts.global_step += 1
            crash_point("step", parts.global_step)
            now = time.perf_counter()
            seconds = now - last_step_time
            pending.append((step_losses, len(records) + len(pending) + 1, lr,
                            global_batch / seconds if seconds > 0 else 0.0, time.time()))
            step_losses = torch.zeros(1 + len(names), device=accelerator.device)
            last_step_time, global_batch = now, 0
            if len(pending) >= LOG_EVERY:
                report()
    report()
    progress.bar.close()

    totals = accelerator.reduce(torch.cat([loss_sums, torch.stack([correct, seen])]), reduction="sum").tolist()
    samples = max(totals[-1], 1)
    return EpochStats(loss=totals[0] / samples, loss_total=sum(r.loss for r in records),
                      acc=totals[-2] / samples if not names else float("nan"), steps=len(records),
                      samples=int(totals[-1]), time_s=time.perf_counter() - epoch_start,
                      components={name: total / samples for name, total in zip(names, totals[1:-2])})


def forward_backward(parts: TrainParts, images: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch: forward, backward and (on the accumulation boundary) the optimizer step.
    Returns the detached [total loss, each component] and the logits (None for detection)."""
    accelerator = parts.accelerator
    with accelerator.accumulate(parts.model):
        targets = labels
        if parts.mixup is not None:
            images, targets = parts.mixup(images, labels)
        if parts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            loss, components, logits = parts.task.loss(parts.model, images, targets, parts.loss_fn)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            parts.strategy.drop_frozen_grads()
            if parts.clip_grad > 0:
                accelerator.clip_grad_norm_(parts.model.parameters(), parts.clip_grad)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
    losses = torch.stack([loss, *components.values()]).detach()
    return losses, None if logits is None else logits.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, channels_last: bool = False) -> EvalResult:
    """Validation loss and accuracy over the whole (gathered, de-duplicated) validation set."""
    model.eval()
    global _evaluations
    _evaluations += 1
    all_logits, all_labels = [], []
    for images, labels in loader:
        crash_point("eval", _evaluations)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    loss = nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(dim=1) == labels).float().mean().item()
    return EvalResult(loss, acc, logits, labels)
