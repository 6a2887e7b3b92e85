"""run_training: one tracked training run, read top to bottom.

config -> recipe (effective config) -> build (data, model, strategy, optimizer) -> loop
-> tracker. Every run that starts and then fails ends FAILED in MLflow (KILLED on Ctrl-C
or SIGTERM), never RUNNING.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import mlexp
from mlexp import checkpoint, tracking
from mlexp.backbones import BackboneSpec, build_backbone, resolve_backbone
from mlexp.calibration import calibrate
from mlexp.config import TrainConfig
from mlexp.data import build_data, check_data_source, loader_kwargs
from mlexp.errors import MlexpError
from mlexp.finetune import attach_head, build_strategy
from mlexp.loop import EvalResult, TrainParts, evaluate, train_one_epoch
from mlexp.optim import build_optimizer, build_scheduler
from mlexp.recipes import apply_init_adjustments, format_init_comparison, format_training_plan
from mlexp.records import History, write_csvs, write_json
from mlexp.resume import ResumePoint, find_resume_point, restore, save_epoch_checkpoints
from mlexp.weights import WeightsFile, default_export_path, locate_weights


@dataclass
class TrainResult:
    run_id: str | None
    status: str
    best_val_acc: float
    best_epoch: int
    effective: TrainConfig
    model: torch.nn.Module | None = field(default=None, repr=False)  # the final (EMA) weights, unwrapped
    history: History | None = field(default=None, repr=False)
    delivered_s: float | None = None  # from the end of training until the server had everything


def run_training(cfg: TrainConfig, *, run_id: str | None = None, extra_tags: dict | None = None,
                 track: bool = True) -> TrainResult:
    """Train one configuration and log it to MLflow (to nothing with track=False).

    `run_id`: log into this existing run (a sweep creates its children first).
    """
    tracking_uri = cfg.tracking_uri or tracking.default_tracking_uri()
    offline = tracking.offline_requested(cfg.offline)
    if cfg.resume and (delivered := deliver_finished_run(cfg.resume)) is not None:
        return delivered
    resume = find_resume_point(tracking_uri, cfg.resume, offline) if cfg.resume else None
    try:
        return _run(cfg, resume, tracking_uri, offline, run_id, extra_tags, track)
    finally:
        if resume is not None:
            resume.cleanup()


def _run(cfg: TrainConfig, resume: ResumePoint | None, tracking_uri: str, offline: bool, run_id: str | None,
         extra_tags: dict | None, track: bool) -> TrainResult:
    if resume:
        effective = resume.config  # already effective: adjustments are not applied twice
        spec = resolve_backbone(effective.backbone, effective.init)
        tracking_uri, offline = resume.tracking_uri or tracking_uri, resume.offline
    else:
        spec = resolve_backbone(cfg.backbone, cfg.init)
        effective = apply_init_adjustments(cfg, spec)
    if effective.dry_run:
        print(format_init_comparison([cfg]) + "\n\n" + format_training_plan([effective]))
        return TrainResult(None, "DRY_RUN", 0.0, 0, effective)
    check_data_source(effective)
    # Find pretrained weights before any MLflow run exists: missing weights are a user error, not a FAILED run.
    weights = locate_weights(spec, effective.weights, tracking_uri) if spec.init == "pretrained" else effective.weights
    accelerator = make_accelerator(effective)
    tracker: tracking.Tracker = tracking.NullTracker()
    if track and accelerator.is_main_process:
        run_name = effective.run_name or default_run_name(spec, effective)
        try:
            tracker = tracking.open_run(tracking_uri, effective.experiment, run_name, run_id=run_id,
                                        resume_run_id=resume.run_id if resume else None,
                                        tags=run_tags(spec, effective, extra_tags), offline=offline)
        except BaseException:
            release_accelerator(accelerator)
            raise
    training = Training(tracker, resume is None)
    try:
        with sigterm_as_interrupt():
            result = _train(effective, spec, weights, accelerator, training, resume)
    except KeyboardInterrupt:
        report_delivery(training.end("KILLED", "interrupted", wait_s=KILLED_WAIT_S), accelerator)
        raise
    except BaseException as error:
        report_delivery(training.end("FAILED", f"{type(error).__name__}: {error}"), accelerator)
        raise
    finally:
        release_accelerator(accelerator)
    ended = time.perf_counter()
    delivery = training.end("FINISHED")
    if delivery is not None and delivery.complete:
        result.delivered_s = time.perf_counter() - ended
    if accelerator.is_main_process:
        print_outcome(result, delivery, tracking_uri)
    return result


def deliver_finished_run(run_id: str) -> TrainResult | None:
    """`--resume` of a run that finished training but whose results never all reached the server
    (killed during its final uploads, or the server was away): send them, train nothing."""
    from mlexp.tracking.outbox import Outbox
    from mlexp.tracking.sync import sync_outbox

    box = Outbox.find(run_id)
    if box is None or box.info().status != "FINISHED" or box.info().offline:
        return None
    config = TrainConfig.from_dict(box.get("config") or {})
    print(f"mlexp: run {run_id} finished training before; sending what it left (as `mlexp sync` does)", flush=True)
    result = sync_outbox(box, None, dry_run=False)
    print(f"mlexp: {result.line()}", flush=True)
    if not result.complete:
        raise MlexpError(f"run {run_id}: {result.line()}; try `mlexp sync --run {run_id}` later")
    return TrainResult(run_id, "FINISHED", float("nan"), 0, config)


@dataclass
class Training:
    """The run's tracker, and whether this process has changed the run's status yet.

    A resume changes nothing on the run until it actually trains: a resume that fails
    before that (bad checkpoint, broken data) leaves the run as it was.
    """

    tracker: tracking.Tracker
    started: bool

    def start(self) -> None:
        if not self.started:
            self.tracker.mark_running()
            self.started = True

    def end(self, status: str, error: str | None = None, wait_s: float | None = None):
        if not self.started:
            return self.tracker.abandon()
        return self.tracker.finish(status, error=error, wait_s=wait_s)


def _train(cfg: TrainConfig, spec: BackboneSpec, weights: WeightsFile | str | None, accelerator: Accelerator,
           training: Training, resume: ResumePoint | None) -> TrainResult:
    tracker = training.tracker
    # --- build ------------------------------------------------------------------------------
    set_seed(cfg.seed)
    data = build_data(cfg)
    built = build_backbone(spec, data.num_classes, cfg.img_size, weights)
    model = built.model
    attach_head(model, cfg.head, data.num_classes)
    strategy = build_strategy(model, spec.family, cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(strategy.param_groups(cfg.weight_decay), cfg)
    train_loader, val_loader = make_loaders(data, cfg, accelerator.num_processes)
    module = model  # wrappers below share its parameters; it is what gets saved and loaded
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    # Not prepared by Accelerate: its wrapper steps the schedule once per process per step.
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    parts = TrainParts(accelerator, model, optimizer, scheduler, make_loss(cfg), strategy, module,
                       mixup=make_mixup(cfg, data.num_classes), clip_grad=cfg.clip_grad,
                       channels_last=cfg.channels_last)
    if cfg.ema:
        from timm.utils import ModelEmaV3

        # Warmup (decay ramps up from 0) so that short runs do not evaluate mostly-initial weights.
        parts.ema = ModelEmaV3(module, decay=cfg.ema_decay, use_warmup=True)
    history, start_epoch = restore(resume, parts) if resume else (History(), 1)
    if resume is None or resume.checkpoint_dir is None:  # a new run, or one killed before its first checkpoint
        log_run_start(tracker, cfg, accelerator, built, module, data)
    training.start()
    if resume and accelerator.is_main_process:
        print(f"mlexp: resuming run {resume.run_id} after epoch {start_epoch - 1} (step {parts.global_step})"
              if resume.checkpoint_dir else f"mlexp: run {resume.run_id} has no complete checkpoint yet: "
              "starting it over from epoch 1 (points it already logged are kept, not logged twice)", flush=True)

    # --- epochs ------------------------------------------------------------------------------
    def on_steps(records) -> None:
        history.add_steps(records)
        for r in records:
            tracker.log_metrics({"batch/loss": r.loss, "batch/lr": r.lr, "batch/samples_per_s": r.samples_per_s},
                                step=r.step)

    for epoch in range(start_epoch, cfg.epochs + 1):
        set_seed(cfg.seed + epoch, device_specific=True)  # resume is deterministic from the epoch alone
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        stats = train_one_epoch(parts, train_loader, epoch, on_steps, f"epoch {epoch}/{cfg.epochs}")
        val = evaluate(eval_model(parts), val_loader, accelerator, cfg.channels_last)
        row = {"epoch": epoch, "samples": stats.samples, "avg_loss": stats.loss, "total_loss": stats.loss_total,
               "train_acc": stats.acc, "val_loss": val.loss, "val_acc": val.acc, "epoch_time_sec": stats.time_s,
               "learning_rate": history.steps[-1][4] if history.steps else cfg.lr, "phase": strategy.phase,
               "trainable_params": strategy.trainable_params(), "checkpoint_path": "checkpoints/last",
               "timestamp": tracking_time()}
        is_best = history.add_epoch(row)
        tracker.log_metrics({"train/loss": stats.loss, "train/loss_total": stats.loss_total,
                             "train/acc": stats.acc, "val/loss": val.loss, "val/acc": val.acc,
                             "epoch/time_s": stats.time_s, "epoch/lr": row["learning_rate"],
                             "train/phase": strategy.phase, "train/trainable_params": row["trainable_params"]},
                            step=epoch)
        if accelerator.is_main_process:
            print_epoch(row, is_best)
        strategy.on_epoch_end(epoch, val.loss)
        stop = strategy.should_stop(epoch) or early_stop(cfg, history, epoch)
        save_epoch_checkpoints(parts, history, epoch, is_best, tracker, cfg)
        if stop:
            break

    # --- the end: final weights, calibration, summary ------------------------------------------
    return finish_run(parts, cfg, spec, built, history, val_loader, tracker)


# --- building blocks ------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig) -> Accelerator:
    cpu = not torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and cpu:
        raise MlexpError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    # cpu=True is what makes torchrun/accelerate launch on a CPU-only machine use DDP over gloo
    # (MULTI_CPU); without it each process silently trains alone.
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def release_accelerator(accelerator: Accelerator) -> None:
    """Let the next run in this process (a sweep's next child) choose its own precision/accumulation.

    Accelerate's state is a process-wide singleton; the process group itself is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def make_loaders(data, cfg: TrainConfig, num_processes: int) -> tuple[DataLoader, DataLoader]:
    # Drop the ragged last batch when a full one exists: mixup needs even batches and
    # BatchNorm cannot train on a batch of one.
    drop_last = len(data.train_set) >= cfg.batch_size * num_processes
    train = DataLoader(data.train_set, shuffle=True, drop_last=drop_last, **loader_kwargs(cfg))
    val = DataLoader(data.val_set, shuffle=False, **loader_kwargs(cfg))
    if len(train) == 0:
        raise MlexpError(f"the training set ({len(data.train_set)} images) is smaller than one batch; "
                         "lower --batch-size")
    return train, val


def make_loss(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # mixup produces (smoothed) soft targets
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def make_mixup(cfg: TrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

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


def default_run_name(spec: BackboneSpec, cfg: TrainConfig) -> str:
    return f"{spec.name}-{cfg.strategy}-s{cfg.seed}" + (f"-f{cfg.fold}" if cfg.folds else "")


def run_tags(spec: BackboneSpec, cfg: TrainConfig, extra: dict | None) -> dict[str, str]:
    tags = {"mlexp.backbone": spec.arch, "mlexp.init": spec.init, "mlexp.strategy": cfg.strategy,
            "mlexp.dataset": Path(cfg.data).name if cfg.data not in ("digits", "synthetic") else cfg.data,
            "mlexp.version": mlexp.__version__}
    commit = git_commit()
    if commit:
        tags["mlexp.git_commit"] = commit
    return {**tags, **(extra or {})}


def git_commit() -> str | None:
    """The commit of the mlexp checkout this code runs from, if it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tracking_time() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat()


def log_run_start(tracker, cfg: TrainConfig, accelerator: Accelerator, built, model, data) -> None:
    """Params (effective), the distributed set-up, parameter counts, and config.json."""
    total = sum(p.numel() for p in model.parameters())
    params = {**cfg.to_params(), "distributed_type": str(accelerator.distributed_type.value),
              "num_processes": str(accelerator.num_processes),
              "global_batch_size": str(cfg.batch_size * cfg.grad_accum * accelerator.num_processes),
              "num_classes": str(data.num_classes), "weights_source": built.weights_source,
              "weights_sha256": built.weights_sha256 or "", "weights_path": built.weights_path or ""}
    tracker.log_params(tracking.params_to_log(params, tracking.existing_params(tracker)))
    tracker.log_metrics({"model/params_total": total}, step=0)
    tracker.remember("config", cfg.to_dict())  # a resume on this machine needs it before the server has it
    tracker.log_artifacts(write_json(cfg.to_dict(), tracker.staging_dir("config") / "config.json").parent, "")


def finish_run(parts: TrainParts, cfg: TrainConfig, spec: BackboneSpec, built, history: History, val_loader,
               tracker) -> TrainResult:
    accelerator = parts.accelerator
    final_model = eval_model(parts)
    calibration = {}
    if cfg.calibrate:
        final_eval: EvalResult = evaluate(final_model, val_loader, accelerator, cfg.channels_last)
        calibration = calibrate(final_eval.logits, final_eval.labels)
    if accelerator.is_main_process:
        weights = final_weights_model(parts).state_dict()
        final = checkpoint.save_weights(weights, tracker.staging_dir("final") / checkpoint.WEIGHTS_FILE)
        if cfg.export_weights:  # later pretrained runs of this arch find these without a flag
            exported = default_export_path(spec)
            exported.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(final, exported)
            print(f"mlexp: exported weights to {exported}")
        last_epoch = history.epochs[-1]["epoch"] if history.epochs else 0
        total_time = sum(row["epoch_time_sec"] for row in history.epochs)
        tracker.log_metrics({"best/val_acc": history.best_val_acc, "best/epoch": history.best_epoch,
                             "time/total_s": total_time,
                             "model/params_trainable": parts.strategy.trainable_params(), **calibration},
                            step=last_epoch)
        info = {"backbone": spec.name, "arch": spec.arch, "timm_model": spec.timm_name, "init": spec.init,
                "status": "FINISHED", "config": cfg.to_dict(),
                "params": {"total": sum(p.numel() for p in parts.module.parameters()),
                           "trainable": parts.strategy.trainable_params()},
                "weights": {"source": built.weights_source, "path": built.weights_path,
                            "sha256": built.weights_sha256},
                "best_epoch": history.best_epoch, "best_val_acc": history.best_val_acc,
                "epoch_losses": [row["avg_loss"] for row in history.epochs],
                "epoch_val_acc": [row["val_acc"] for row in history.epochs],
                "epoch_times": [row["epoch_time_sec"] for row in history.epochs],
                "total_time_s": total_time, "calibration": calibration,
                "artifacts": {"config": "config.json", "last": "checkpoints/last/",
                              "best": "checkpoints/best/model.safetensors",
                              "final": "checkpoints/final/model.safetensors",
                              "epoch_metrics": "metrics/epoch_metrics.csv",
                              "batch_metrics": "metrics/batch_metrics.csv"}}
        summary = write_json(info, tracker.staging_dir("summary") / "training_info.json").parent
        metrics = tracker.staging_dir("metrics")
        write_csvs(history, metrics)
        tracker.log_artifacts(final.parent, "checkpoints/final")
        tracker.log_artifacts(summary, "summary")
        tracker.log_artifacts(metrics, "metrics")
    return TrainResult(tracker.run_id, "FINISHED", history.best_val_acc, history.best_epoch, cfg,
                       final_weights_model(parts), history)


# --- what the user sees ------------------------------------------------------------------------
def print_epoch(row: dict, is_best: bool) -> None:
    print(f"epoch {row['epoch']:>3}  train loss {row['avg_loss']:.4f} acc {row['train_acc']:.3f}  "
          f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  {row['epoch_time_sec']:.1f}s"
          + ("  (best)" if is_best else ""), flush=True)


KILLED_WAIT_S = 5.0  # Ctrl-C: a short wait for the sender, then the rest stays in the outbox
LOGGED = ("params, tags, per-batch and per-epoch metrics, config.json, checkpoints/{last,best,final}, "
          "summary/training_info.json, metrics/*.csv")


def print_outcome(result: TrainResult, delivery, tracking_uri: str) -> None:
    """What the run left, said as it is: FINISHED only where the store has everything."""
    if delivery is None:
        return
    where = f"open it: {open_hint(tracking_uri)}"
    if delivery.complete:
        print(f"\nmlexp: run {delivery.run_id} FINISHED: best val acc {result.best_val_acc:.4f} at epoch "
              f"{result.best_epoch}\n  logged: {LOGGED}\n  {where}", flush=True)
        return
    if delivery.offline:
        print(f"\nmlexp: offline run {delivery.run_id} FINISHED: best val acc {result.best_val_acc:.4f} at epoch "
              f"{result.best_epoch}; {delivery.describe()}", flush=True)
        return
    print(f"\nmlexp: run {delivery.run_id}: training finished (best val acc {result.best_val_acc:.4f} at epoch "
          f"{result.best_epoch}), but {delivery.describe()}", flush=True)


def report_delivery(delivery, accelerator: Accelerator) -> None:
    """After a failure or interruption: where whatever the server lacks is kept."""
    if delivery is not None and not delivery.complete and accelerator.is_main_process:
        print(f"mlexp: run {delivery.run_id} ({delivery.status}): {delivery.describe()}", file=sys.stderr, flush=True)


def open_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"



@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what torchrun and schedulers send) ends the run KILLED, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
