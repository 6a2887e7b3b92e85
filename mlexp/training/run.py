"""run_training: one tracked training run, read top to bottom.

config -> recipe (effective config) -> build (data, model, strategy, optimizer) -> loop
-> tracker. Every run that starts and then fails ends FAILED in MLflow (KILLED on Ctrl-C
or SIGTERM), never RUNNING.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from mlexp import tracking
from mlexp.config import TrainConfig, config_hash
from mlexp.data.digests import cross_split_duplicates, describe_splits, split_digest
from mlexp.data.loading import loader_kwargs, loader_samples_per_s
from mlexp.errors import MlexpError, RunFailed
from mlexp.faults import crash_point
from mlexp.models.build import build_backbone
from mlexp.models.catalogue import BackboneSpec, resolve_backbone
from mlexp.models.weight_sources import WeightsFile, locate_weights
from mlexp.option_values import best_is_max
from mlexp.tasks.kinds import task_of
from mlexp.tracking.outbox import Outbox, outbox_root, outbox_unwritable
from mlexp.tracking.sync import sync_outbox
from mlexp.training.console import print_epoch, print_outcome, print_start, print_weights_report, report_delivery
from mlexp.training.interrupts import raise_if_stopped, stops_as_interrupt
from mlexp.training.live_logs import FILES, LiveLogs, NoLogs, open_live_logs
from mlexp.training.loop import TrainParts, evaluate, train_one_epoch
from mlexp.training.parts import (
    build_parts,
    early_stop,
    eval_model,
    final_weights_model,
    make_accelerator,
    release_accelerator,
)
from mlexp.training.recipes import apply_init_adjustments, format_init_comparison, format_training_plan
from mlexp.training.records import History, epoch_metrics, epoch_record, step_metrics, task_epoch_record
from mlexp.training.reports import (
    TrainResult,
    default_run_name,
    finish_run,
    log_run_start,
    run_tags,
    start_system_metrics,
    stop_system_metrics,
)
from mlexp.training.resume import ResumePoint, find_resume_point, read_started_config, restore, save_epoch_checkpoints


def run_training(cfg: TrainConfig, *, run_id: str | None = None, extra_tags: dict | None = None,
                 track: bool = True, spec: BackboneSpec | None = None,
                 judge: Callable[[int, dict], bool] | None = None) -> TrainResult:
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
    from_best = cfg.resume_from == "best"
    if from_best and not cfg.resume:
        raise MlexpError("--resume-from best needs --resume RUN_ID: the run whose best checkpoint to continue from")
    if cfg.resume and not from_best and (delivered := deliver_finished_run(cfg.resume)) is not None:
        return delivered
    resume = find_resume_point(tracking_uri, cfg.resume, offline, from_best) if cfg.resume else None
    try:
        return _run(cfg, resume, tracking_uri, offline, run_id, extra_tags, track, spec, judge)
    finally:
        if resume is not None:
            resume.cleanup()


def _run(cfg: TrainConfig, resume: ResumePoint | None, tracking_uri: str, offline: bool, run_id: str | None,
         extra_tags: dict | None, track: bool, spec: BackboneSpec | None,
         judge: Callable[[int, dict], bool] | None = None) -> TrainResult:
    if resume:
        effective = resume.config  # already effective: adjustments are not applied twice
        spec = resolve_backbone(effective.backbone, effective.init, effective.plugins)
        tracking_uri, offline = resume.tracking_uri or tracking_uri, resume.offline
    else:
        spec = spec or resolve_backbone(cfg.backbone, cfg.init, cfg.plugins)
        effective = apply_init_adjustments(cfg, spec)
    spec = spec.with_in_chans(effective.in_chans)
    if effective.dry_run:
        print(format_init_comparison([cfg]) + "\n\n" + format_training_plan([effective]))
        return TrainResult(None, "DRY_RUN", 0.0, 0, effective)
    task_of(effective).check_data(effective)
    # Find pretrained weights before any MLflow run exists: missing weights are a user error, not a FAILED run.
    weights = (locate_weights(spec, effective.weights, tracking_uri, weights_from=effective.weights_from)
               if spec.init == "pretrained" else effective.weights)
    accelerator = make_accelerator(effective)
    try:
        tracker = open_tracker(effective, spec, tracking_uri, offline, run_id, extra_tags, resume) \
            if track and accelerator.is_main_process else tracking.NullTracker()
    except BaseException:
        release_accelerator(accelerator)
        raise
    training = Training(tracker, resume is None or resume.branch, tracking_uri, judge=judge)
    system = start_system_metrics(tracker, effective)
    try:
        with stops_as_interrupt():
            try:
                result = _train(effective, spec, weights, accelerator, training, resume)
                raise_if_stopped()  # a stop swallowed after the last step: the run did not end as asked
            finally:  # before the run ends: no sample may follow its final status
                stop_system_metrics(system)
    except KeyboardInterrupt:
        report_delivery(training.end("KILLED", "interrupted", wait_s=KILLED_WAIT_S), accelerator)
        raise
    except BaseException as error:
        said = f"{type(error).__name__}: {error}"
        delivery = training.end("FAILED", f"its outbox cannot be written ({said})" if outbox_unwritable(error) else said)
        if outbox_unwritable(error):  # recorded on the server directly; the cause in one line, not two tracebacks
            raise RunFailed(f"run {tracker.run_id} FAILED: its outbox cannot be written ({error}); free space "
                            f"under {outbox_root()} (or set MLEXP_OUTBOX_DIR), then `mlexp sync` sends what it "
                            "holds") from None
        report_delivery(delivery, accelerator)
        raise
    finally:
        release_accelerator(accelerator)
    ended = time.perf_counter()
    delivery = training.end("FINISHED")
    if delivery is not None and delivery.status == "FAILED":  # trained, but the outbox took no final status
        raise RunFailed(f"run {delivery.run_id} FAILED after training: its outbox cannot be written; free space "
                        f"under {outbox_root()}, then `mlexp sync` sends what it holds")
    if delivery is not None and delivery.complete:
        result.delivered_s = time.perf_counter() - ended
    if accelerator.is_main_process:
        print_outcome(result, delivery, tracking_uri)
    return result


def open_tracker(effective: TrainConfig, spec: BackboneSpec, tracking_uri: str, offline: bool, run_id: str | None,
                 extra_tags: dict | None, resume: ResumePoint | None) -> tracking.Tracker:
    """The run this process logs to: new, adopted (`run_id`), resumed, or a branch of another's best epoch."""
    tags = run_tags(spec, effective, extra_tags)
    if resume and resume.branch:  # a new run, continuing another's best epoch
        tags["mlexp.resumed_from"] = f"{resume.run_id} best epoch {resume.epoch}"
    return tracking.open_run(tracking_uri, effective.experiment, effective.run_name or default_run_name(spec, effective),
                             run_id=run_id, resume_run_id=resume.run_id if resume and not resume.branch else None,
                             tags=tags, offline=offline)


def check_same_configuration(cfg: TrainConfig, spec: BackboneSpec | None, started: TrainConfig,
                             run_id: str) -> None:
    """A run continues only the configuration it started with: never a different model."""
    planned = apply_init_adjustments(cfg, spec or resolve_backbone(cfg.backbone, cfg.init, cfg.plugins))
    if config_hash(started) != config_hash(planned):
        raise MlexpError(f"run {run_id} was started with another configuration; it continues only with "
                         f"`mlexp train --resume {run_id}`")


def deliver_finished_run(run_id: str) -> TrainResult | None:
    """`--resume` of a run that finished training but whose results never all reached the server
    (killed during its final uploads, or the server was away): send them, train nothing."""

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
    live: LiveLogs | NoLogs = field(default_factory=NoLogs)  # the run's local logs, once it trains
    # After each epoch, with its record: True stops the run there (a tuning study's pruner).
    judge: Callable[[int, dict], bool] | None = None

    def start(self) -> None:
        if not self.started:
            self.tracker.mark_running()
            self.started = True

    def end(self, status: str, error: str | None = None, wait_s: float | None = None):
        try:
            self.live.flush_steps()
            self.live.event("end", status=status, error=error)
        except OSError:  # the local logs are a convenience: a full disk must not keep the run's status back
            pass
        if not self.started:
            return self.tracker.abandon()
        return self.tracker.finish(status, error=error, wait_s=wait_s)


def _train(cfg: TrainConfig, spec: BackboneSpec, weights: WeightsFile | str | None, accelerator: Accelerator,
           training: Training, resume: ResumePoint | None) -> TrainResult:
    tracker = training.tracker
    set_seed(cfg.seed)
    task = task_of(cfg)
    data = task.build_data(cfg)
    built = build_backbone(spec, data.num_classes, cfg.img_size, weights, cfg.weights_strict, cfg.weights_key_map)
    model = task.build_model(spec, built.model, cfg, data.num_classes)
    parts, train_loader, val_loader = build_parts(cfg, spec, model, data, accelerator, task)
    history, start_epoch = restore(resume, parts) if resume else (History(), 1)
    history.components = list(task.components)
    history.val_metrics = [] if task.name == "classification" else [f"val/{name}" for name in task.metrics]
    if resume and resume.branch:  # it starts from the best epoch's weights: they stay the best until beaten
        parts.best_weights = {name: tensor.detach().to("cpu", copy=True)
                              for name, tensor in final_weights_model(parts).state_dict().items()}
    if accelerator.is_main_process:
        print_start(cfg, spec, built, data, accelerator, tracker, training.tracking_uri)
        print_weights_report(built)
    described = describe_splits(data, cfg.data)
    splits = [split.to_dict() for split in described]
    if resume is None or resume.checkpoint_dir is None or resume.branch:  # a new run, or one killed before its first checkpoint
        log_run_start(tracker, cfg, accelerator, built, parts, data)
        for row in history.epochs if resume else []:  # a branch: the epochs it continues from, as they were
            tracker.log_metrics(epoch_metrics(row), step=row["epoch"])
        tracker.log_inputs(splits)
        tracker.set_tags({"mlexp.split_digest": split_digest(described)})
        report_duplicates(tracker, data, accelerator.is_main_process)
        if accelerator.is_main_process:  # once per run: is the loader or the model the bottleneck?
            rate = loader_samples_per_s(train_loader.dataset, cfg, parts.workers, collate=task.collate)
            tracker.log_metrics({"perf/loader_samples_per_s": rate}, step=0)
    training.start()
    training.live = live_logs(cfg, tracker, history, resume, start_epoch, accelerator.is_main_process)
    if resume and resume.branch and accelerator.is_main_process:
        print(f"mlexp: continuing run {resume.run_id}'s best epoch ({start_epoch - 1}) in run {tracker.run_id}",
              flush=True)
    elif resume and accelerator.is_main_process:
        print(f"mlexp: resuming run {resume.run_id} after epoch {start_epoch - 1} (step {parts.global_step})"
              if resume.checkpoint_dir else f"mlexp: run {resume.run_id} has no complete checkpoint yet: "
              "starting it over from epoch 1 (points it already logged are kept, not logged twice)", flush=True)
    test_loader = None
    if data.test_set is not None:
        test_loader = accelerator.prepare(DataLoader(data.test_set, shuffle=False, collate_fn=task.collate,
                                                     **loader_kwargs(cfg, parts.workers)))
    elif accelerator.is_main_process:
        print("mlexp: no test set (no DATA/test, --test-dir or --test-split): the test evaluation is skipped",
              flush=True)
    train_epochs(parts, cfg, history, start_epoch, train_loader, val_loader, tracker, training.live, training.judge)
    return finish_run(parts, cfg, spec, built, history, val_loader, tracker, test_loader, data, splits)


def report_duplicates(tracker, data, main_process: bool) -> None:
    """Exact copies across the splits, before training: logged (data/duplicates_*), and said."""
    counts, examples = cross_split_duplicates(data)
    tracker.log_metrics(counts, step=0)
    if main_process and any(counts.values()):
        found = ", ".join(f"{n} {key.removeprefix('data/duplicates_').replace('_in_', ' image(s) in ')}"
                          for key, n in counts.items() if n)
        print(f"mlexp: warning: exact copies across the splits: {found} (e.g. {examples[0]}); the held-out "
              "accuracy overstates", flush=True)


def live_logs(cfg: TrainConfig, tracker, history: History, resume: ResumePoint | None, start_epoch: int,
              main_process: bool) -> LiveLogs | NoLogs:
    """The run's local logs (mlexp.training.live_logs), said where at the start."""
    continued = resume is not None and not resume.branch and resume.checkpoint_dir is not None
    live = open_live_logs(cfg.log_dir, tracker.run_id, history, start_epoch - 1 if continued else None, main_process)
    if isinstance(live, LiveLogs):
        live.event("resume" if continued else "start", run_id=tracker.run_id, after_epoch=start_epoch - 1)
        print(f"mlexp: live logs (tail -f): {live.folder}/ ({', '.join(FILES)})", flush=True)
    return live


PRUNED_TAG = "mlexp.pruned_after_epoch"  # a tuning study's pruner stopped the run after this epoch


def train_epochs(parts: TrainParts, cfg: TrainConfig, history: History, start_epoch: int, train_loader,
                 val_loader, tracker, live: LiveLogs | NoLogs, judge: Callable[[int, dict], bool] | None = None
                 ) -> None:
    """The epochs: train, evaluate, record, checkpoint; until the last epoch or a stop. A copy
    of the best epoch's weights is kept (the end-of-run report and the `best` model use them)."""
    def on_steps(records) -> None:
        history.add_steps(records)
        live.steps(history.steps[-len(records):])
        for record in records:
            tracker.log_metrics(step_metrics(record), step=record.step)
            crash_point("logged", record.step)  # the points are buffered, not yet committed to the outbox
        raise_if_stopped()  # every few steps: a Ctrl-C that a finalizer swallowed (mlexp.training.interrupts)

    strategy = parts.strategy
    for epoch in range(start_epoch, cfg.epochs + 1):
        set_seed(cfg.seed + epoch, device_specific=True)  # resume is deterministic from the epoch alone
        train_loader.set_epoch(epoch)  # Accelerate's seedable sampler: this epoch's shuffle
        if hasattr(train_loader.dataset, "set_epoch"):  # EpochSeeded: this epoch's augmentations
            train_loader.dataset.set_epoch(epoch)
        stats = train_one_epoch(parts, train_loader, epoch, on_steps, f"epoch {epoch}/{cfg.epochs}")
        lr = history.steps[-1][4] if history.steps else cfg.lr
        row, val_loss = evaluate_epoch(parts, val_loader, epoch, stats, lr)
        is_best = history.add_epoch(row, cfg.best_metric, best_is_max(cfg.best_metric, cfg.best_mode))
        live.epoch(history.epochs[-1])
        if is_best:
            parts.best_weights = {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in final_weights_model(parts).state_dict().items()}
        tracker.log_metrics(epoch_metrics(row), step=epoch)
        if parts.accelerator.is_main_process:
            print_epoch(row, is_best, cfg.best_metric)
        strategy.on_epoch_end(epoch, val_loss)
        pruned = bool(judge and judge(epoch, row))
        if pruned:  # on the run before it ends: whoever sees it FINISHED knows it was cut short
            tracker.set_tags({PRUNED_TAG: str(epoch)})
        stop = strategy.should_stop(epoch) or early_stop(cfg, history, epoch) or pruned
        save_epoch_checkpoints(parts, history, epoch, is_best, tracker, cfg)
        if stop:
            break


def evaluate_epoch(parts: TrainParts, val_loader, epoch: int, stats, lr: float) -> tuple[dict, float]:
    """The epoch's record, with its validation scores (the task's), and its validation loss
    (what gradual unfreezing watches; NaN where the task's model has none in eval mode)."""
    strategy, model = parts.strategy, eval_model(parts)
    if parts.task.name != "classification":  # a detector's mAPs, a user task's own metrics
        scores, _ = parts.task.evaluate(model, val_loader, parts.accelerator, [])
        return task_epoch_record(epoch, stats, scores, lr, strategy.phase, strategy.trainable_params()), \
            float(scores.get("loss", float("nan")))
    val = evaluate(model, val_loader, parts.accelerator, parts.channels_last)
    return epoch_record(epoch, stats, val, lr, strategy.phase, strategy.trainable_params()), val.loss


KILLED_WAIT_S = 5.0  # Ctrl-C: a short wait for the sender, then the rest stays in the outbox
