"""`mlexp evaluate` and `mlexp register`: from a logged model to numbers on new data, and to a
registered name that people and `mlflow models serve` use.

evaluate: a logged model (runs:/, models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID)
on any image folder, with the transforms it was trained with; an evaluation run gets the
same test/* metrics and evaluation/test/ report as a training run's test set, plus every
image's prediction, and is linked to the model (model input, metrics linked to it). A
detector is scored on a COCO or YOLO folder of its classes as its run's test split is
(test/map, test/map_50, test/map_75, evaluation/test/per_class_ap.csv).

register: the best `best` logged model of the chosen experiments, by a validation metric
(never by a test metric: choosing by the test set would make it a second validation set),
by default the one each run chose its best epoch by (--best-metric, --best-mode), registered
under a name with an alias pointing at it. Registering again moves the alias.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelStatus
from torch.utils.data import DataLoader

from mlexp import tracking
from mlexp.data.digests import describe
from mlexp.data.images import CheckedImageFolder
from mlexp.errors import MlexpError
from mlexp.option_values import best_is_max, best_key
from mlexp.tasks.detection.annotations import is_detection_folder
from mlexp.tasks.detection.data import band_names
from mlexp.tasks.detection.evaluation import detection_folder, evaluate_detector_on
from mlexp.tracking import registry
from mlexp.training.evaluation import split_metrics, write_report
from mlexp.training.logged_models import (
    MODEL_TAG,
    MODEL_TYPE,
    Classifier,
    download_classifier,
    load_classifier,
    resolve,
)
from mlexp.training.loop import EvalResult

EVAL_BATCH = 64


@dataclass
class Evaluated:
    run_id: str | None
    model_id: str
    metrics: dict[str, float]
    predictions: list[int]  # per image, in the folder's order
    paths: list[str]
    delivered: bool


def evaluate_model(model_uri: str, data: str, tracking_uri: str | None, experiment: str,
                   run_name: str | None = None, run_id: str | None = None, echo=print) -> Evaluated:

    uri = tracking_uri or tracking.default_tracking_uri()
    tracking.check_reachable(uri)
    client = tracking.client_for(uri)
    model = resolve(client, model_uri)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise MlexpError(f"--data {data}: {'not a folder' if root.exists() else 'no such folder'} (expected an "
                         "image folder with one sub-folder per class, or a detector's COCO or YOLO folder)")
    workdir = Path(tempfile.mkdtemp(prefix="mlexp-evaluate-"))
    try:
        classifier = load_classifier(download_classifier(client, model, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    task = classifier.config.get("task", "classification")
    if task not in ("classification", "detection"):
        raise MlexpError(f"--model {model_uri} is a model of the task {task}: `mlexp evaluate` scores classifiers "
                         "and detectors on a folder; its runs' test/* metrics come from the task's test split")
    score = score_detector if task == "detection" else score_classifier
    scored = score(classifier, root, lambda count: echo(
        f"mlexp: evaluating {model_uri} (logged model {model.model_id}, {model.name} of run {model.source_run_id}) "
        f"on {count} images of {root}"))
    tracker = tracking.open_run(uri, experiment, run_name or f"evaluate-{model.name}-{root.name}", run_id=run_id,
                                tags={"mlexp.evaluated_model": model.model_id, "mlexp.evaluated_uri": model_uri,
                                      "mlexp.dataset": root.name, **{k: v for k, v in model.tags.items()
                                                                     if k.startswith("mlexp.") and k != MODEL_TAG}})
    try:
        tracker.log_params({"model": model_uri, "model_id": model.model_id, "data": str(root),
                            "source_run_id": model.source_run_id or ""})
        tracker.log_inputs([scored.split], [model.model_id])
        tracker.log_metrics(scored.metrics, step=0)
        report = tracker.staging_dir("evaluation-test")
        scored.write(report)
        tracker.log_artifacts(report, "evaluation/test")
        tracker.link_metrics(model.model_id, [[key, 0] for key in scored.metrics], {"test": scored.split})
    except BaseException as error:
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", f"{type(error).__name__}: {error}")
        raise
    delivery = tracker.finish("FINISHED")
    echo(f"mlexp: {scored.said}")
    echo(f"mlexp: evaluation run {tracker.run_id}: {delivery.describe()}")
    return Evaluated(tracker.run_id, model.model_id, scored.metrics, scored.predicted, scored.paths, delivery.complete)


@dataclass
class Scored:
    """A model's numbers on a folder, before any run exists: what the evaluation run logs."""

    metrics: dict[str, float]  # test/*
    split: dict  # the folder as the run's test input (mlexp.data.digests)
    write: Callable[[Path], None]  # the evaluation/test/ report into a folder
    said: str  # the one line the user reads
    predicted: list[int] = field(default_factory=list)  # a classifier's, per image
    paths: list[str] = field(default_factory=list)


def score_classifier(classifier: Classifier, root: Path, starting: Callable[[int], None]) -> Scored:
    """Accuracy and the rest of a training run's test/* on an image folder of the model's classes."""
    folder = CheckedImageFolder(str(root), classifier.transform, classifier.config.get("in_chans", 3))
    check_same_classes(folder.classes, classifier.class_names, root)
    starting(len(folder))
    result = run_model(classifier, folder)
    metrics = {f"test/{key}": value for key, value in split_metrics(result).items()}
    paths = [path for path, _ in folder.samples]

    def write(report: Path) -> None:
        write_report(result, classifier.class_names, report)
        write_predictions(report / "predictions.csv", paths, result, classifier.class_names, root)

    said = (f"test acc {100 * metrics['test/acc']:.2f}%, balanced acc {100 * metrics['test/balanced_acc']:.2f}%, "
            f"macro F1 {metrics['test/macro_f1']:.4f}, loss {metrics['test/loss']:.4f}")
    return Scored(metrics, describe(folder, "test", root.name, str(root), len(folder.classes)).to_dict(), write, said,
                  result.logits.argmax(dim=1).tolist(), paths)


def score_detector(detector: Classifier, root: Path, starting: Callable[[int], None]) -> Scored:
    """COCO's mAPs and each class's AP on a detection folder (COCO or YOLO) of the model's classes,
    its images resized as the run's were."""
    if not is_detection_folder(root):
        raise MlexpError(f"--data {root}: a detector is evaluated on a folder with annotations.json (COCO) or "
                         "images/ and labels/ (YOLO)")
    config = detector.config
    images, class_names = detection_folder(root, int(config["img_size"]), int(config.get("in_chans", 3)),
                                           band_names(config.get("bands")))
    check_same_classes(class_names, detector.class_names, root)
    starting(len(images))
    found, per_class = evaluate_detector_on(detector.model, images, detector.class_names)
    metrics = {f"test/{key}": value for key, value in found.items()}

    def write(report: Path) -> None:
        with open(report / "per_class_ap.csv", "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=["class", "ap"])
            writer.writeheader()
            writer.writerows(per_class)

    said = (f"test mAP {metrics['test/map']:.4f}, mAP@50 {metrics['test/map_50']:.4f}, "
            f"mAP@75 {metrics['test/map_75']:.4f}")
    return Scored(metrics, describe(images, "test", root.name, str(root), len(class_names)).to_dict(), write, said,
                  paths=[path for path, _ in images.samples])


def check_same_classes(found: list[str], trained: list[str], root: Path) -> None:
    if found == trained:
        return
    missing, extra = sorted(set(trained) - set(found)), sorted(set(found) - set(trained))
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"not trained on {', '.join(extra)}"]
                                                                     if extra else [])
    raise MlexpError(f"the classes of {root} differ from the model's: " + ("; ".join(parts) or
                     f"same names in another order ({found} vs {trained})"))


@torch.no_grad()
def run_model(classifier: Classifier, folder):
    logits, labels = [], []
    for images, targets in DataLoader(folder, batch_size=EVAL_BATCH, shuffle=False):
        logits.append(classifier.model(images).float())
        labels.append(targets)
    logits, labels = torch.cat(logits), torch.cat(labels)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return EvalResult(loss, (logits.argmax(dim=1) == labels).float().mean().item(), logits, labels)


def write_predictions(path: Path, paths: list[str], result, class_names: list[str], root: Path) -> None:
    probabilities = torch.softmax(result.logits, dim=1).numpy()
    table = pd.DataFrame({"image": [str(Path(p).relative_to(root)) for p in paths],
                          "label": [class_names[i] for i in result.labels.tolist()],
                          "predicted": [class_names[i] for i in result.logits.argmax(dim=1).tolist()],
                          "confidence": probabilities.max(axis=1)})
    table = pd.concat([table, pd.DataFrame(probabilities.astype(np.float32), columns=[f"p_{c}" for c in class_names])],
                      axis=1)
    table.to_csv(path, index=False)


# --- the registry -----------------------------------------------------------------------------------
@dataclass
class Registered:
    name: str
    version: str
    alias: str
    model_id: str
    run_id: str
    value: float


DESCRIPTIONS = {"classification": "An mlexp image classifier: uint8 RGB images in, class probabilities out.",
                "detection": "An mlexp object detector: uint8 RGB images in, each image's boxes, class names and "
                             "scores out."}


def description(task: str) -> str:
    return DESCRIPTIONS.get(task, f"An mlexp model of the task {task}: its task's example_input in, its predict's rows "
                                  "out.")


def register_best(name: str, experiments: list[str], tracking_uri: str | None, metric: str | None = None,
                  alias: str = "champion", model_uri: str | None = None, echo=print) -> Registered:
    """Register `model_uri`, else the best mlexp `best` model of `experiments` by `metric` (higher
    is better unless it names a loss), by default by the metric each run chose its best epoch
    by (--best-metric, --best-mode), under `name`, and point `alias` at it."""
    uri = tracking_uri or tracking.default_tracking_uri()
    tracking.check_reachable(uri)
    client = tracking.client_for(uri)
    if model_uri:
        model, metric = resolve(client, model_uri), metric or "val/acc"
    else:
        model, metric = best_model(client, experiments, metric)
    value = model_value(model, metric)
    value = float("nan") if value is None else value
    version = registry.register_version(
        client, name, model, alias, {MODEL_TAG: MODEL_TYPE},
        description=description((model.params or {}).get("task", "classification")))
    echo(f"mlexp: registered {name} version {version} (logged model {model.model_id}, {model.name} of run "
         f"{model.source_run_id}, {metric} {value:.4f}); models:/{name}@{alias} points at it")
    return Registered(name, version, alias, model.model_id, model.source_run_id, value)


def best_model(client, experiments: list[str], metric: str | None):
    """(the best READY `best` model of the experiments, the metric it won by). `metric` None:
    each model's own --best-metric and --best-mode (its `best` weights are its best epoch by
    them); models that chose by different metrics cannot be ranked on one scale, and registering
    moves an alias people serve from, so that is a user error naming --metric, not a guess."""
    ids = []
    for experiment in experiments:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise MlexpError(f"no experiment named {experiment!r} at {client.tracking_uri}")
        ids.append(found.experiment_id)
    candidates = [m for m in search_all(client, ids, f"name = 'best' AND tags.`{MODEL_TAG}` = '{MODEL_TYPE}'")
                  if m.status == LoggedModelStatus.READY]
    if metric:
        key, higher = metric, best_is_max(metric, "auto")
    else:
        key, higher = own_best_metric(candidates, experiments)
    scored = [(value, model) for model in candidates if (value := model_value(model, key)) is not None]
    if not scored:
        raise MlexpError(f"no finished mlexp run in {', '.join(experiments)} has a 'best' model with {key} "
                         "(runs log their models when they finish)")
    return max(scored, key=lambda pair: pair[0] if higher else -pair[0])[1], key


def own_best_metric(models: list, experiments: list[str]) -> tuple[str, bool]:
    """The one (--best-metric, higher is better) the models' runs chose their best epochs by."""
    chosen = {}
    for model in models:
        params = model.params or {}
        metric = params.get("best_metric") or "val/acc"  # models from before --best-metric: val/acc
        chosen.setdefault((metric, best_is_max(metric, params.get("best_mode") or "auto")), []).append(model)
    if len(chosen) > 1:
        said = ", ".join(f"{metric} ({'max' if higher else 'min'}): {len(found)} run(s)"
                         for (metric, higher), found in sorted(chosen.items()))
        raise MlexpError(f"the runs of {', '.join(experiments)} chose their best epochs by different metrics "
                         f"({said}); say which to rank their best models by: --metric KEY (e.g. --metric val/acc)")
    return next(iter(chosen), ("val/acc", True))


def model_value(model, metric: str) -> float | None:
    """The model's value of `metric`: the point linked to it (its best epoch's), else best/<metric>."""
    values = {point.key: point.value for point in model.metrics or []}
    return values.get(metric, values.get(best_key(metric)))


def search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every logged model the filter finds, page by page (ranking them is ours: one sweep's
    models may be ranked by different metrics)."""
    found, token = [], None
    while True:
        page = client.search_logged_models(experiment_ids, filter_string=filter_string, max_results=100,
                                           page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found
