"""What a run records about itself at its start (tags, params, config.json) and at its end
(the test and validation reports, best and final weights, summary, CSVs, logged models), and
its system metrics."""

from __future__ import annotations

import csv
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

import mlexp
from mlexp import tracking
from mlexp.config import TrainConfig, config_hash
from mlexp.data.transforms import data_config
from mlexp.models.catalogue import BackboneSpec
from mlexp.models.heads import find_classifier
from mlexp.models.weight_sources import default_export_path
from mlexp.option_values import best_key
from mlexp.tasks.kinds import is_served, task_of
from mlexp.training import checkpoints, hardware
from mlexp.training.calibration import calibrate
from mlexp.training.evaluation import best_weights_model, split_metrics, write_report
from mlexp.training.loop import EvalResult, TrainParts, evaluate
from mlexp.training.parts import eval_model, final_weights_model
from mlexp.training.records import History, epoch_metric_names, training_info, write_csvs, write_json
from mlexp.training.system_metrics import SystemMetrics


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

    total = sum(p.numel() for p in parts.module.parameters())
    chosen = {"mixed_precision": accelerator.mixed_precision, "channels_last": str(parts.channels_last).lower(),
              "workers": str(parts.workers), **hardware.cuda_settings()}
    transforms = data_config(cfg)
    params = {**cfg.to_params(), "distributed_type": str(accelerator.distributed_type.value),
              "num_processes": str(accelerator.num_processes),
              "global_batch_size": str(cfg.batch_size * cfg.grad_accum * accelerator.num_processes),
              "num_classes": str(data.num_classes), "weights_source": built.weights_source,
              "weights_sha256": built.weights_sha256 or "", "weights_path": built.weights_path or "",
              **weights_params(built), "strategy_phases": " ; ".join(parts.strategy.patterns)[:500],
              **{f"effective.{key}": value for key, value in chosen.items()},
              **{f"data.{key}": str(value) for key, value in transforms.items()}}
    tracker.log_params(tracking.params_to_log(params, tracking.existing_params(tracker)))
    tracker.log_metrics({"model/params_total": total}, step=0)
    tracker.remember("config", cfg.to_dict())  # a resume on this machine needs it before the server has it
    recorded = {**cfg.to_dict(), "data_config": transforms, "effective": chosen}
    tracker.log_artifacts(write_json(recorded, tracker.staging_dir("config") / "config.json").parent, "")
    if built.load_report is not None:
        report = write_json(built.load_report.to_dict(), tracker.staging_dir("weights") / "load_report.json")
        tracker.log_artifacts(report.parent, "weights")


def weights_params(built) -> dict[str, str]:
    """Which module is the classifier (and by which rule), and what the weights file gave."""
    names, rule = find_classifier(built.model)
    params = {"classifier": f"{','.join(names)} ({rule})"}
    if built.load_report is not None:
        report = built.load_report
        params.update(weights_loaded=str(len(report.loaded)), weights_new=str(len(report.new)),
                      weights_unused=str(len(report.unused)))
    return params


def evaluate_splits(parts: TrainParts, history: History, test_loader, val_loader, tracker, last_epoch: int,
                    class_names: list[str]) -> list[str]:
    """The end-of-run report (mlexp.training.evaluation) of the test set (when there is one) and of the
    validation set, with the best-on-validation weights; the metric keys it logged (at the last
    epoch's step). test/epoch says whose weights they were: the best epoch; after a resume that
    began past it, the final weights."""

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
    logged = {f"val/{key}": value for key, value in split_metrics(results["val"]).items()
              if key not in ("acc", "loss", "macro_f1")}
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


def evaluate_task_splits(parts: TrainParts, history: History, test_loader, val_loader, tracker,
                         last_epoch: int, class_names: list[str]) -> list[str]:
    """Another task's end-of-run report (a detector's, a user's own): its metrics of the
    best-on-validation weights on the test set (a detector's test/map, test/map_50, test/map_75;
    test/epoch) and its per-class rows on every split, where it has them (a detector's AP:
    evaluation/{val,test}/per_class_ap.csv)."""
    model = best_weights_model(final_weights_model(parts), parts.best_weights)
    epoch = history.best_epoch if parts.best_weights is not None else last_epoch
    results = {"val": parts.task.evaluate(model, val_loader, parts.accelerator, class_names)}
    if test_loader is not None:
        results["test"] = parts.task.evaluate(model, test_loader, parts.accelerator, class_names)
    if not parts.accelerator.is_main_process:
        return []
    logged = {f"test/{key}": value for key, value in results["test"][0].items()} if "test" in results else {}
    if logged:
        logged["test/epoch"] = epoch
        tracker.log_metrics(logged, step=last_epoch)
        print(f"mlexp: test set, weights of epoch {epoch}: "
              + ", ".join(f"{key} {value:.4f}" for key, value in results["test"][0].items()))
    for split, (_, rows) in results.items():
        if not rows:
            continue
        folder = tracker.staging_dir(f"evaluation-{split}")
        with open(folder / "per_class_ap.csv", "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=["class", "ap"])
            writer.writeheader()
            writer.writerows(rows)
        tracker.log_artifacts(folder, f"evaluation/{split}")
    return list(logged)


def finish_run(parts: TrainParts, cfg: TrainConfig, spec: BackboneSpec, built, history: History, val_loader,
               tracker, test_loader, data, splits: list[dict]) -> TrainResult:
    accelerator = parts.accelerator
    final_model = eval_model(parts)
    last_epoch = history.epochs[-1]["epoch"] if history.epochs else 0
    classification = cfg.task == "classification"
    evaluate_all = evaluate_splits if classification else evaluate_task_splits
    reported = evaluate_all(parts, history, test_loader, val_loader, tracker, last_epoch, data.class_names)
    calibration = {}
    if cfg.calibrate and classification:  # temperature scaling calibrates class probabilities
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
        tracker.log_metrics({**({"best/val_acc": history.best_val_acc} if classification else {}),
                             "best/epoch": history.best_epoch,
                             best_key(cfg.best_metric): history.best_value,
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
        if cfg.log_models and is_served(task_of(cfg)):
            log_models(tracker, parts, cfg, spec, history, data, splits, reported, last_epoch)
        elif cfg.log_models:
            print(f"mlexp: a {cfg.task} run logs its weights (checkpoints/final, checkpoints/best), not a logged "
                  "model: its task has no example_input and predict (README, \"Your own task\")", flush=True)
    return TrainResult(tracker.run_id, "FINISHED", history.best_val_acc, history.best_epoch, cfg,
                       final_weights_model(parts), history, tested=test_loader is not None)


def log_models(tracker, parts: TrainParts, cfg: TrainConfig, spec: BackboneSpec, history: History, data,
               splits: list[dict], reported: list[str], last_epoch: int) -> None:
    """The best and final weights as MLflow logged models (mlexp.training.logged_models), at their epochs'
    steps, linked to those epochs' metrics (the best one also to the end-of-run report, which
    its weights produced) and through them to the splits."""
    # here: it loads mlflow.pyfunc (about 2 s), which a run with --log-models false never needs
    from mlexp.training.logged_models import MODEL_TAG, MODEL_TYPE, example_images, staged_model

    task = task_of(cfg)
    config = cfg.to_dict()
    example = np.asarray(task.example_input(data)) if hasattr(task, "example_input") else example_images(data.val_set)
    datasets = {split["context"]: split for split in splits}
    tags = {MODEL_TAG: MODEL_TYPE, "mlexp.backbone": spec.arch, "mlexp.init": spec.init,
            "mlexp.strategy": cfg.strategy}
    final_weights = final_weights_model(parts).state_dict()
    best_weights = parts.best_weights or final_weights  # a resume begun past the best epoch: the final weights
    best_step = history.best_epoch if parts.best_weights is not None else last_epoch
    best_metrics = reported + sorted({best_key(task_of(cfg).primary_metric), best_key(cfg.best_metric)})
    for name, weights, step, extra in (("best", best_weights, best_step, best_metrics),
                                       ("final", final_weights, last_epoch, [])):
        folder = staged_model(tracker, name, config, data.class_names, weights, example)
        metrics = ([[key, step] for key in epoch_metric_names(history.components, history.val_metrics)]
                   + [[key, last_epoch] for key in extra])
        tracker.log_model(folder, name, step, {"metrics": metrics, "datasets": datasets, "tags": tags,
                                               "params": cfg.to_params(), "model_type": MODEL_TYPE})


def start_system_metrics(tracker, cfg: TrainConfig):
    """System metrics for a tracked run (mlexp.training.system_metrics), numbered on from a resumed run's."""
    if not cfg.system_metrics or isinstance(tracker, tracking.NullTracker):
        return None

    return SystemMetrics(tracker, tracker.last_step("system/cpu_utilization_percentage")).start()


def stop_system_metrics(system) -> None:
    if system is not None:
        system.stop()


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
