"""The tasks a run can train, one object each: what data it reads, what model it makes of the
backbone, its loss as a total plus named components, and how it is scored. The training loop,
records and console ask the run's task instead of assuming classification.

    task.check_data(cfg)                          -> None, or MlexpError: before any run exists
    task.build_data(cfg)                          -> DataBundle (train, val, test sets, classes)
    task.build_model(spec, backbone, cfg, n)      -> the module that trains (a classifier, a detector)
    task.loss(model, images, targets, loss_fn)    -> (total, {component: value}, logits or None)
    task.evaluate(model, loader, accelerator, classes) -> ({metric: value}, per-class rows): val/<metric>
    task.components                               -> the component names (batch/<name>, train/<name>)
    task.metrics                                  -> what evaluate returns (val/<name> each epoch, test/<name>)
    task.primary_metric                           -> what chooses the best epoch unless --best-metric says
    task.higher_is_better (optional)              -> its direction (else: lower for losses and errors)
    task.example_input(data) (optional, serving)  -> a batch as a client sends it (NumPy), from the run's data
    task.predict(model, inputs, cfg) (optional)   -> one dict per input: what its served model answers

A user's own task plugs in as a user's own backbone does (mlexp.models.plugins): `--task
MODULE:CLASS` (importable from the current folder, or installed), or a name a package declares
once in the `mlexp.tasks` entry-point group (`healer = "mypackage.tasks:Healer"`). Its runs log
their components, metrics, checkpoints and resume like any other. With `example_input` and
`predict` its runs also log `best` and `final` as MLflow models that `mlflow models serve`
answers with (its module's source travels inside them); temperature calibration is
classification's.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Protocol

import torch
from torch import nn

from mlexp.config import TrainConfig
from mlexp.data.images import DataBundle
from mlexp.data.sources import build_data, check_data_source
from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec
from mlexp.models.plugins import import_user_module
from mlexp.models.strategies import attach_head

TASK_GROUP = "mlexp.tasks"  # the entry-point group a package names its tasks in


class Task(Protocol):
    name: str
    components: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    collate: Callable | None  # how a batch's samples become the batch (None: torch's default)

    def check_data(self, cfg: TrainConfig) -> None: ...

    def build_data(self, cfg: TrainConfig) -> DataBundle: ...

    def build_model(self, spec: BackboneSpec, backbone: nn.Module, cfg: TrainConfig, num_classes: int) -> nn.Module:
        ...

    def loss(self, model: nn.Module, images: torch.Tensor, targets, loss_fn: nn.Module
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]: ...

    def evaluate(self, model: nn.Module, loader, accelerator, class_names: list[str]
                 ) -> tuple[dict[str, float], list[dict]]: ...


class Classification:
    """Its evaluation is the richer one of mlexp.training (loss, accuracy, F1, confusion, calibration)."""

    name, components, metrics, primary_metric, collate = "classification", (), ("loss", "acc", "macro_f1"), \
        "val/acc", None

    def check_data(self, cfg: TrainConfig) -> None:
        check_data_source(cfg)

    def build_data(self, cfg: TrainConfig) -> DataBundle:
        return build_data(cfg)

    def build_model(self, spec: BackboneSpec, backbone: nn.Module, cfg: TrainConfig, num_classes: int) -> nn.Module:
        attach_head(backbone, cfg.head, num_classes)
        return backbone

    def loss(self, model, images, targets, loss_fn):
        logits = model(images)
        return loss_fn(logits, targets), {}, logits


class Detection:
    """Faster R-CNN over the backbone (mlexp.tasks.detection.model); torchvision's four losses."""

    name, primary_metric, metrics = "detection", "val/map", ("map", "map_50", "map_75")
    components = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")

    @property
    def collate(self) -> Callable:
        from mlexp.tasks.detection.images import collate  # here: as above

        return collate

    def check_data(self, cfg: TrainConfig) -> None:
        """The detection extra installed, and every split's annotations read and checked, before any run exists."""
        from mlexp.tasks.detection.data import detection_splits  # here: a classification run never reads them

        missing = [name for name in ("torchmetrics", "pycocotools") if importlib.util.find_spec(name) is None]
        if missing:
            raise MlexpError(f"--task detection needs {' and '.join(missing)}: pip install 'mlexp[detection]'")
        detection_splits(cfg)

    def build_data(self, cfg: TrainConfig) -> DataBundle:
        from mlexp.tasks.detection.data import detection_bundle  # here: as above

        return detection_bundle(cfg)

    def build_model(self, spec: BackboneSpec, backbone: nn.Module, cfg: TrainConfig, num_classes: int) -> nn.Module:
        from mlexp.tasks.detection.model import build_detector  # here: torchvision's detection models, ~0.3 s

        return build_detector(spec, backbone, num_classes, cfg.img_size, cfg.in_chans)

    def loss(self, model, images, targets, loss_fn):
        losses = model(images, targets)
        parts = {name: losses[name] for name in self.components}
        return sum(parts.values()), parts, None

    def evaluate(self, model, loader, accelerator, class_names):
        """COCO's mAPs (torchmetrics), and each class's AP."""
        from mlexp.tasks.detection.evaluation import evaluate_detector  # here: as above

        return evaluate_detector(model, loader, accelerator, class_names)


TASKS: dict[str, Task] = {"classification": Classification(), "detection": Detection()}
REQUIRED = ("name", "components", "metrics", "primary_metric", "collate", "check_data", "build_data", "build_model",
            "loss", "evaluate")


def is_served(task: Task) -> bool:
    """Whether the task's runs log MLflow models: the built-in tasks, and a user's task that
    says what a client sends (example_input) and what its model answers (predict)."""
    return task.name in TASKS or (hasattr(task, "example_input") and hasattr(task, "predict"))


def task_reference(name: str) -> str | None:
    """MODULE:CLASS of a user's task (None for a built-in one): what a logged model rebuilds it
    from, where no package declares its name."""
    return None if name in TASKS else declared_tasks().get(name, name)


def declared_tasks() -> dict[str, str]:
    """name -> MODULE:CLASS of the tasks installed packages declare (the `mlexp.tasks` entry points)."""
    return {point.name: point.value for point in entry_points(group=TASK_GROUP)}


def task_of(cfg: TrainConfig) -> Task:
    return task_named(cfg.task)


@functools.cache
def task_named(name: str) -> Task:
    """A built-in task, a task a package declares (entry points), or MODULE:CLASS of the user's own."""
    if name in TASKS:
        return TASKS[name]
    declared = declared_tasks()
    reference = declared.get(name, name)
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise MlexpError(f"--task {name!r} is not a task: {', '.join([*TASKS, *sorted(declared)])}, or "
                         "MODULE:CLASS of your own (README, \"Your own task\")")
    found = getattr(import_user_module(module_name, f"--task {name}"), attribute, None)
    if found is None:
        raise MlexpError(f"--task {name}: module {module_name!r} has no {attribute!r}")
    try:
        task = found() if isinstance(found, type) else found
    except TypeError as error:  # a class whose constructor wants arguments
        raise MlexpError(f"--task {name}: {attribute}() cannot be made without arguments ({error})") from None
    missing = [part for part in REQUIRED if not hasattr(task, part)]
    if missing:
        raise MlexpError(f"--task {name}: {attribute} lacks {', '.join(missing)} (a task has: {', '.join(REQUIRED)}; "
                         "README, \"Your own task\")")
    if not task.primary_metric.startswith("val/") or task.primary_metric[4:] not in task.metrics:
        raise MlexpError(f"--task {name}: its primary_metric {task.primary_metric!r} must be val/ and one of its "
                         f"metrics ({', '.join(task.metrics)})")
    return task
