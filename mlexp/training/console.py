"""What a training run tells its user: the start line, one line per epoch, and the outcome,
said as it is (FINISHED only where the store has everything)."""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import Accelerator

from mlexp import tracking
from mlexp.config import TrainConfig
from mlexp.credentials import redact
from mlexp.models.catalogue import BackboneSpec
from mlexp.tasks.kinds import is_served, task_of
from mlexp.training import checkpoints


def print_start(cfg: TrainConfig, spec: BackboneSpec, built, data, accelerator: Accelerator, tracker,
                tracking_uri: str) -> None:
    """One line before training: what is trained, from which weights, on what data, for how
    many epochs, on which device, logged where. Weights found in the weights folder (no
    --weights given) are announced on a line of their own: they change what a run means."""
    if built.weights_source == "weights-dir":
        print(f"mlexp: NOTE: pretrained weights picked up from the weights folder: {built.weights_path} "
              "(--weights FILE chooses others; --init scratch uses none)", flush=True)
    adjusted = f" (scratch x{cfg.scratch_epochs_mult:g})" if spec.init == "scratch" and \
        cfg.scratch_epochs_mult != 1 else ""
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    where = "offline (`mlexp sync` sends it)" if getattr(tracker, "offline", False) else redact(tracking_uri)
    run = f"run {tracker.run_id}" if tracker.run_id else "untracked"
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    print(f"mlexp: {spec.name} ({spec.init}, weights: {describe_weights(built)}) | {data.name}: "
          f"{len(data.train_set)} train / {len(data.val_set)} val"
          f"{f' / {len(data.test_set)} test' if data.test_set is not None else ''} images, {data.num_classes} classes, "
          f"{cfg.img_size}px | {cfg.epochs} epochs{adjusted} | {accelerator.device.type} {precision}, {processes} | "
          f"{run} -> {where}", flush=True)


def describe_weights(built) -> str:
    if built.weights_source == "none":
        return "random init"
    text = f"{built.weights_source} {built.weights_path} sha256 {(built.weights_sha256 or '')[:12]}"
    exported_by = checkpoints.weights_metadata(Path(built.weights_path)).get("mlexp.run_id")
    return text + (f", exported by run {exported_by}" if exported_by else "")


def print_weights_report(built) -> None:
    """`mlexp: weights: loaded 118 of 130 tensors from FILE; 12 new: stci.*; ...` when anything
    of the network or the file was left out (a partial load, another class count)."""
    report = built.load_report
    if report is not None and (report.new or report.unused):
        print(f"mlexp: weights: {report.summary()}", flush=True)


def print_epoch(row: dict, is_best: bool, best_metric: str = "val/acc") -> None:
    chosen = "" if best_metric in ("val/acc", "val/map") else f" by {best_metric}"
    if "val/map" in row:  # detection: the loss's parts, and COCO's mAPs
        parts = "  ".join(f"{key.removeprefix('train/loss_')} {value:.4f}" for key, value in row.items()
                          if key.startswith("train/loss_") and key != "train/loss_total")
        print(f"epoch {row['epoch']:>3}  train loss {row['train/loss']:.4f} ({parts})  val mAP {row['val/map']:.3f} "
              f"mAP50 {row['val/map_50']:.3f}  {row['epoch/time_s']:.1f}s" + (f"  (best{chosen})" if is_best else ""),
              flush=True)
        return
    if "val/acc" not in row:  # a task of the user's own: its loss's parts, its validation metrics
        parts = "  ".join(f"{key.removeprefix('train/')} {value:.4f}" for key, value in row.items() if key.startswith(
            "train/") and key not in ("train/loss", "train/loss_total", "train/phase", "train/trainable_params"))
        scores = "  ".join(f"{key} {value:.4f}" for key, value in row.items() if key.startswith("val/"))
        print(f"epoch {row['epoch']:>3}  train loss {row['train/loss']:.4f} ({parts})  {scores}  "
              f"{row['epoch/time_s']:.1f}s" + (f"  (best{chosen})" if is_best else ""), flush=True)
        return
    print(f"epoch {row['epoch']:>3}  train loss {row['train/loss']:.4f} acc {row['train/acc']:.3f}  "
          f"val loss {row['val/loss']:.4f} acc {row['val/acc']:.3f}  {row['epoch/time_s']:.1f}s"
          + (f"  (best{chosen})" if is_best else ""), flush=True)


LOGGED = ("params, tags, datasets, per-batch and per-epoch metrics, config.json, checkpoints/{last,best,final}, "
          "summary/training_info.json, metrics/*.csv")


def print_outcome(result, delivery, tracking_uri: str) -> None:
    """What the run left, said as it is: FINISHED only where the store has everything."""
    if delivery is None:
        return
    if delivery.complete:
        where = f"open it: {redact(tracking.ui_hint(tracking_uri, run_experiment_id(tracking_uri, delivery.run_id)))}"
        task = result.effective.task
        evaluation = {"classification": "(per-class table, confusion matrix)", "detection": "(per-class AP)"}
        print(f"\nmlexp: run {delivery.run_id} FINISHED: {best_phrase(result)}\n  logged: {LOGGED}"
              + (", logged models best and final"
                 if result.effective.log_models and is_served(task_of(result.effective)) else "")
              + (f", evaluation/{'{test,val}' if result.tested else 'val'}/ {evaluation[task]}" if task in evaluation
                 else "") + f"\n  {where}", flush=True)
        return
    if delivery.offline:
        print(f"\nmlexp: offline run {delivery.run_id} FINISHED: {best_phrase(result)}; {delivery.describe()}",
              flush=True)
        return
    print(f"\nmlexp: run {delivery.run_id}: training finished ({best_phrase(result)}), but {delivery.describe()}",
          flush=True)


def best_phrase(result) -> str:
    """'best val acc 0.9120 at epoch 7', or by another --best-metric: 'best val/loss 0.2810 at epoch 5
    (val acc 0.9010)'."""
    metric = result.effective.best_metric
    if result.effective.task != "classification" and result.history is not None:
        return f"best {metric} {result.history.best_value:.4f} at epoch {result.best_epoch}"
    if metric == "val/acc" or result.history is None or result.history.best_value is None:
        return f"best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch}"
    return (f"best {metric} {result.history.best_value:.4f} at epoch {result.best_epoch} "
            f"(val acc {result.best_val_acc:.4f})")


def run_experiment_id(tracking_uri: str, run_id: str) -> str | None:
    try:
        return tracking.client_for(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - only a hint: without it the address is the UI's front page
        return None


def report_delivery(delivery, accelerator: Accelerator) -> None:
    """After a failure or interruption: where whatever the server lacks is kept."""
    if delivery is not None and not delivery.complete and accelerator.is_main_process:
        print(f"mlexp: run {delivery.run_id} ({delivery.status}): {delivery.describe()}", file=sys.stderr, flush=True)
