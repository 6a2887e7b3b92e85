"""run_training: one tracked training run, read top to bottom.

config -> recipe (effective config) -> build (data, model, strategy, optimizer) -> loop
-> tracker. Every run that starts and then fails ends FAILED in MLflow (KILLED on Ctrl-C
or SIGTERM), never RUNNING.
"""

from __future__ import annotations

import math
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import mlexp
from mlexp import tracking
from mlexp.config import TrainConfig, config_hash
from mlexp.data.digests import describe_splits
from mlexp.data.sources import (
    BUILT_IN,
    EpochSeeded,
    build_data,
    check_data_source,
    loader_kwargs,
    loader_samples_per_s,
)
from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec, build_backbone, resolve_backbone
from mlexp.models.strategies import attach_head, build_strategy
from mlexp.models.weight_sources import WeightsFile, default_export_path, locate_weights
from mlexp.training import checkpoints, hardware
from mlexp.training.calibration import calibrate
from mlexp.training.console import (
    print_epoch,
    print_outcome,
    print_start,
    report_delivery,
)
from mlexp.training.loop import EvalResult, TrainParts, evaluate, train_one_epoch
from mlexp.training.optimizer import build_optimizer, build_scheduler
from mlexp.training.recipes import (
    apply_init_adjustments,
    format_init_comparison,
    format_training_plan,
)
from mlexp.training.records import (
    History,
    epoch_metrics,
    epoch_record,
    step_metrics,
    training_info,
    write_csvs,
    write_json,
)
from mlexp.training.resume import (
    ResumePoint,
    find_resume_point,
    read_started_config,
    restore,
    save_epoch_checkpoints,
)


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
    tested: bool = False  # a test set was evaluated (evaluation/test/ logged beside evaluation/val/)


def run_training(cfg: TrainConfig, *, run_id: str | None = None, extra_tags: dict | None = None,
                 track: bool = True, spec: BackboneSpec | None = None) -> TrainResult:
    """Train one configuration and log it to MLflow (to nothing with track=False).

    `run_id`: log into this existing run (a sweep creates its children first); a run that
    already started training (a child whose process was killed, retried by Ray or by the
    next sweep) continues from its newest checkpoint. `spec`: the backbone already resolved
    from `cfg` (by the CLI's pre-check, or a sweep's plan).
    """
    tracking_uri = cfg.tracking_uri or tracking.default_tracking_uri()
    offline = tracking.offline_requested(cfg.offline)
    started = read_started_config(tracking_uri, run_id, offline) if run_id and not cfg.resume else None
    if started is not None:  # it trained before (and was killed): continue it, the same configuration only
        check_same_configuration(cfg, spec, started, run_id)
        cfg = cfg.replace(resume=run_id)
    if cfg.resume and (delivered := deliver_finished_run(cfg.resume)) is not None:
        return delivered
    resume = find_resume_point(tracking_uri, cfg.resume, offline) if cfg.resume else None
    try:
        return _run(cfg, resume, tracking_uri, offline, run_id, extra_tags, track, spec)
    finally:
        if resume is not None:
            resume.cleanup()


def _run(cfg: TrainConfig, resume: ResumePoint | None, tracking_uri: str, offline: bool, run_id: str | None,
         extra_tags: dict | None, track: bool, spec: BackboneSpec | None) -> TrainResult:
    if resume:
        effective = resume.config  # already effective: adjustments are not applied twice
        spec = resolve_backbone(effective.backbone, effective.init)
        tracking_uri, offline = resume.tracking_uri or tracking_uri, resume.offline
    else:
        spec = spec or resolve_backbone(cfg.backbone, cfg.init)
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
    training = Training(tracker, resume is None, tracking_uri)
    system = start_system_metrics(tracker, effective)
    try:
        with sigterm_as_interrupt():
            try:
                result = _train(effective, spec, weights, accelerator, training, resume)
            finally:  # before the run ends: no sample may follow its final status
                stop_system_metrics(system)
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


def check_same_configuration(cfg: TrainConfig, spec: BackboneSpec | None, started: TrainConfig,
                             run_id: str) -> None:
    """A run continues only the configuration it started with: never a different model."""
    planned = apply_init_adjustments(cfg, spec or resolve_backbone(cfg.backbone, cfg.init))
    if config_hash(started) != config_hash(planned):
        raise MlexpError(f"run {run_id} was started with another configuration; it continues only with "
                         f"`mlexp train --resume {run_id}`")


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
    tracking_uri: str

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
    set_seed(cfg.seed)
    data = build_data(cfg)
    built = build_backbone(spec, data.num_classes, cfg.img_size, weights)
    parts, train_loader, val_loader = build_parts(cfg, spec, built.model, data, accelerator)
    history, start_epoch = restore(resume, parts) if resume else (History(), 1)
    if accelerator.is_main_process:
        print_start(cfg, spec, built, data, accelerator, tracker, training.tracking_uri)
    splits = [split.to_dict() for split in describe_splits(data, cfg.data)]
    if resume is None or resume.checkpoint_dir is None:  # a new run, or one killed before its first checkpoint
        log_run_start(tracker, cfg, accelerator, built, parts, data)
        tracker.log_inputs(splits)
        if accelerator.is_main_process:  # once per run: is the loader or the model the bottleneck?
            rate = loader_samples_per_s(train_loader.dataset, cfg, parts.workers)
            tracker.log_metrics({"perf/loader_samples_per_s": rate}, step=0)
    training.start()
    if resume and accelerator.is_main_process:
        print(f"mlexp: resuming run {resume.run_id} after epoch {start_epoch - 1} (step {parts.global_step})"
              if resume.checkpoint_dir else f"mlexp: run {resume.run_id} has no complete checkpoint yet: "
              "starting it over from epoch 1 (points it already logged are kept, not logged twice)", flush=True)
    test_loader = None
    if data.test_set is not None:
        test_loader = accelerator.prepare(DataLoader(data.test_set, shuffle=False,
                                                     **loader_kwargs(cfg, parts.workers)))
    elif accelerator.is_main_process:
        print("mlexp: no test set (no DATA/test, --test-dir or --test-split): the test evaluation is skipped",
              flush=True)
    train_epochs(parts, cfg, history, start_epoch, train_loader, val_loader, tracker)
    return finish_run(parts, cfg, spec, built, history, val_loader, tracker, test_loader, data, splits)


def build_parts(cfg: TrainConfig, spec: BackboneSpec, model: torch.nn.Module, data,
                accelerator: Accelerator) -> tuple[TrainParts, DataLoader, DataLoader]:
    """Head, strategy, optimizer, loaders, schedule and EMA around the built backbone."""
    attach_head(model, cfg.head, data.num_classes)
    strategy = build_strategy(model, spec.family, cfg)
    channels_last = hardware.choose_channels_last(cfg.channels_last, accelerator.device.type,
                                                  hardware.is_convolutional(model), spec.family)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(strategy.param_groups(cfg.weight_decay), cfg, accelerator.device.type)
    workers = hardware.worker_count(cfg, built_in=cfg.data in BUILT_IN)
    train_loader, val_loader = make_loaders(data, cfg, accelerator.num_processes, workers)
    module = model  # wrappers below share its parameters; it is what gets saved and loaded
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    # Not prepared by Accelerate: its wrapper steps the schedule once per process per step.
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    parts = TrainParts(accelerator, model, optimizer, scheduler, make_loss(cfg), strategy, module,
                       mixup=make_mixup(cfg, data.num_classes), clip_grad=cfg.clip_grad,
                       channels_last=channels_last, workers=workers)
    if cfg.ema:
        from timm.utils import ModelEmaV3

        # Warmup (decay ramps up from 0) so that short runs do not evaluate mostly-initial weights.
        parts.ema = ModelEmaV3(module, decay=cfg.ema_decay, use_warmup=True)
    return parts, train_loader, val_loader


def train_epochs(parts: TrainParts, cfg: TrainConfig, history: History, start_epoch: int, train_loader,
                 val_loader, tracker) -> None:
    """The epochs: train, evaluate, record, checkpoint; until the last epoch or a stop. A copy
    of the best epoch's weights is kept (the end-of-run report and the `best` model use them)."""
    def on_steps(records) -> None:
        history.add_steps(records)
        for record in records:
            tracker.log_metrics(step_metrics(record), step=record.step)

    strategy = parts.strategy
    for epoch in range(start_epoch, cfg.epochs + 1):
        set_seed(cfg.seed + epoch, device_specific=True)  # resume is deterministic from the epoch alone
        train_loader.set_epoch(epoch)  # Accelerate's seedable sampler: this epoch's shuffle
        if hasattr(train_loader.dataset, "set_epoch"):  # EpochSeeded: this epoch's augmentations
            train_loader.dataset.set_epoch(epoch)
        stats = train_one_epoch(parts, train_loader, epoch, on_steps, f"epoch {epoch}/{cfg.epochs}")
        val = evaluate(eval_model(parts), val_loader, parts.accelerator, parts.channels_last)
        lr = history.steps[-1][4] if history.steps else cfg.lr
        row = epoch_record(epoch, stats, val, lr, strategy.phase, strategy.trainable_params())
        is_best = history.add_epoch(row)
        if is_best:
            parts.best_weights = {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in final_weights_model(parts).state_dict().items()}
        tracker.log_metrics(epoch_metrics(row), step=epoch)
        if parts.accelerator.is_main_process:
            print_epoch(row, is_best)
        strategy.on_epoch_end(epoch, val.loss)
        stop = strategy.should_stop(epoch) or early_stop(cfg, history, epoch)
        save_epoch_checkpoints(parts, history, epoch, is_best, tracker, cfg)
        if stop:
            break


# --- building blocks ------------------------------------------------------------------------------
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


def make_loaders(data, cfg: TrainConfig, num_processes: int, workers: int) -> tuple[DataLoader, DataLoader]:
    # Drop the ragged last batch when a full one exists: mixup needs even batches and
    # BatchNorm cannot train on a batch of one.
    drop_last = len(data.train_set) >= cfg.batch_size * num_processes
    train = DataLoader(EpochSeeded(data.train_set, cfg.seed), shuffle=True, drop_last=drop_last,
                       **loader_kwargs(cfg, workers))
    val = DataLoader(data.val_set, shuffle=False, **loader_kwargs(cfg, workers))
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
            "mlexp.version": mlexp.__version__, "mlexp.config_hash": config_hash(cfg)}
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


def log_run_start(tracker, cfg: TrainConfig, accelerator: Accelerator, built, parts: TrainParts, data) -> None:
    """Params (effective), the distributed set-up, what `auto` became on this machine, the
    data config (timm's, for this backbone), parameter counts, and config.json."""
    from mlexp.data.transforms import data_config

    total = sum(p.numel() for p in parts.module.parameters())
    chosen = {"mixed_precision": accelerator.mixed_precision, "channels_last": str(parts.channels_last).lower(),
              "workers": str(parts.workers), **hardware.cuda_settings()}
    transforms = data_config(cfg)
    params = {**cfg.to_params(), "distributed_type": str(accelerator.distributed_type.value),
              "num_processes": str(accelerator.num_processes),
              "global_batch_size": str(cfg.batch_size * cfg.grad_accum * accelerator.num_processes),
              "num_classes": str(data.num_classes), "weights_source": built.weights_source,
              "weights_sha256": built.weights_sha256 or "", "weights_path": built.weights_path or "",
              **{f"effective.{key}": value for key, value in chosen.items()},
              **{f"data.{key}": str(value) for key, value in transforms.items()}}
    tracker.log_params(tracking.params_to_log(params, tracking.existing_params(tracker)))
    tracker.log_metrics({"model/params_total": total}, step=0)
    tracker.remember("config", cfg.to_dict())  # a resume on this machine needs it before the server has it
    recorded = {**cfg.to_dict(), "data_config": transforms, "effective": chosen}
    tracker.log_artifacts(write_json(recorded, tracker.staging_dir("config") / "config.json").parent, "")


def evaluate_splits(parts: TrainParts, history: History, test_loader, val_loader, tracker, last_epoch: int,
                    class_names: list[str]) -> list[str]:
    """The end-of-run report (mlexp.training.evaluation) of the test set (when there is one) and of the
    validation set, with the best-on-validation weights; the metric keys it logged (at the last
    epoch's step). test/epoch says whose weights they were: the best epoch; after a resume that
    began past it, the final weights."""
    from mlexp.training.evaluation import (
        best_weights_model,
        split_metrics,
        write_report,
    )

    model = best_weights_model(final_weights_model(parts), parts.best_weights)
    epoch = history.best_epoch if parts.best_weights is not None else last_epoch
    if parts.best_weights is None and history.best_epoch != last_epoch and parts.accelerator.is_main_process:
        print(f"mlexp: WARNING: the best epoch ({history.best_epoch}) was before this resume began: the end-of-run "
              f"report uses the final weights (epoch {last_epoch}); test/epoch says so", flush=True)
    results = {"val": evaluate(model, val_loader, parts.accelerator, parts.channels_last)}
    if test_loader is not None:
        results["test"] = evaluate(model, test_loader, parts.accelerator, parts.channels_last)
    if not parts.accelerator.is_main_process:
        return []
    # val/acc and val/loss are the per-epoch curves: the end-of-run report adds the rest
    logged = {f"val/{key}": value for key, value in split_metrics(results["val"]).items() if key not in ("acc", "loss")}
    if "test" in results:
        logged |= {f"test/{key}": value for key, value in split_metrics(results["test"]).items()}
        logged["test/epoch"] = epoch
    tracker.log_metrics(logged, step=last_epoch)
    for split, result in results.items():
        folder = tracker.staging_dir(f"evaluation-{split}")
        write_report(result, class_names, folder)
        tracker.log_artifacts(folder, f"evaluation/{split}")
    if "test" in results:
        test = split_metrics(results["test"])
        print(f"mlexp: test set ({len(results['test'].labels)} images), weights of epoch {epoch}: acc "
              f"{100 * test['acc']:.2f}%, balanced acc {100 * test['balanced_acc']:.2f}%, macro F1 "
              f"{test['macro_f1']:.4f}, loss {test['loss']:.4f}")
    return list(logged)


def finish_run(parts: TrainParts, cfg: TrainConfig, spec: BackboneSpec, built, history: History, val_loader,
               tracker, test_loader, data, splits: list[dict]) -> TrainResult:
    accelerator = parts.accelerator
    final_model = eval_model(parts)
    last_epoch = history.epochs[-1]["epoch"] if history.epochs else 0
    reported = evaluate_splits(parts, history, test_loader, val_loader, tracker, last_epoch, data.class_names)
    calibration = {}
    if cfg.calibrate:
        final_eval: EvalResult = evaluate(final_model, val_loader, accelerator, parts.channels_last)
        calibration = calibrate(final_eval.logits, final_eval.labels)
    if accelerator.is_main_process:
        weights = final_weights_model(parts).state_dict()
        final = checkpoints.save_weights(weights, tracker.staging_dir("final") / checkpoints.WEIGHTS_FILE)
        if cfg.export_weights:  # later pretrained runs of this arch find these without a flag
            exported = checkpoints.save_weights(weights, default_export_path(spec), metadata={
                "mlexp.run_id": tracker.run_id or "", "mlexp.backbone": spec.name})
            print(f"mlexp: exported weights to {exported}")
        total_time = sum(history.column("epoch/time_s"))
        tracker.log_metrics({"best/val_acc": history.best_val_acc, "best/epoch": history.best_epoch,
                             "time/total_s": total_time, **hardware.peak_memory_mb(),
                             "model/params_trainable": parts.strategy.trainable_params(), **calibration},
                            step=last_epoch)
        info = training_info(spec, cfg, built, history, calibration,
                             params={"total": sum(p.numel() for p in parts.module.parameters()),
                                     "trainable": parts.strategy.trainable_params()})
        summary = write_json(info, tracker.staging_dir("summary") / "training_info.json").parent
        metrics = tracker.staging_dir("metrics")
        write_csvs(history, metrics)
        tracker.log_artifacts(final.parent, "checkpoints/final")
        tracker.log_artifacts(summary, "summary")
        tracker.log_artifacts(metrics, "metrics")
        if cfg.log_models:
            log_models(tracker, parts, cfg, spec, history, data, splits, reported, last_epoch)
    return TrainResult(tracker.run_id, "FINISHED", history.best_val_acc, history.best_epoch, cfg,
                       final_weights_model(parts), history, tested=test_loader is not None)


def log_models(tracker, parts: TrainParts, cfg: TrainConfig, spec: BackboneSpec, history: History, data,
               splits: list[dict], reported: list[str], last_epoch: int) -> None:
    """The best and final weights as MLflow logged models (mlexp.training.logged_models), at their epochs'
    steps, linked to those epochs' metrics (the best one also to the end-of-run report, which
    its weights produced) and through them to the splits."""
    from mlexp.training.logged_models import (
        MODEL_TAG,
        MODEL_TYPE,
        example_images,
        staged_model,
    )
    from mlexp.training.records import EPOCH_METRICS

    config, example = cfg.to_dict(), example_images(data.val_set)
    datasets = {split["context"]: split for split in splits}
    tags = {MODEL_TAG: MODEL_TYPE, "mlexp.backbone": spec.arch, "mlexp.init": spec.init,
            "mlexp.strategy": cfg.strategy}
    final_weights = final_weights_model(parts).state_dict()
    best_weights = parts.best_weights or final_weights  # a resume begun past the best epoch: the final weights
    best_step = history.best_epoch if parts.best_weights is not None else last_epoch
    for name, weights, step, extra in (("best", best_weights, best_step, reported + ["best/val_acc"]),
                                       ("final", final_weights, last_epoch, [])):
        folder = staged_model(tracker, name, config, data.class_names, weights, example)
        metrics = [[key, step] for key in EPOCH_METRICS] + [[key, last_epoch] for key in extra]
        tracker.log_model(folder, name, step, {"metrics": metrics, "datasets": datasets, "tags": tags,
                                               "params": cfg.to_params(), "model_type": MODEL_TYPE})


def start_system_metrics(tracker, cfg: TrainConfig):
    """System metrics for a tracked run (mlexp.training.system_metrics), numbered on from a resumed run's."""
    if not cfg.system_metrics or isinstance(tracker, tracking.NullTracker):
        return None
    from mlexp.training.system_metrics import SystemMetrics

    return SystemMetrics(tracker, tracker.last_step("system/cpu_utilization_percentage")).start()


def stop_system_metrics(system) -> None:
    if system is not None:
        system.stop()


KILLED_WAIT_S = 5.0  # Ctrl-C: a short wait for the sender, then the rest stays in the outbox


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
