"""The tasks a run can train, one object each: what data it reads, what model it makes of the
backbone, and its loss as a total plus named components. The training loop, records and
console ask the run's task instead of assuming classification.

    task.build_data(cfg)                          -> DataBundle (train, val, test sets, classes)
    task.build_model(spec, backbone, cfg, n)      -> the module that trains (a classifier, a detector)
    task.loss(model, images, targets, loss_fn)    -> (total, {component: value}, logits or None)
    task.components                               -> the component names (batch/loss_<name>, train/<name>)
    task.primary_metric                           -> what chooses the best epoch unless --best-metric says
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from mlexp.config import TrainConfig
from mlexp.data.images import DataBundle
from mlexp.data.sources import build_data, check_data_source
from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec
from mlexp.models.strategies import attach_head


class Task(Protocol):
    name: str
    components: tuple[str, ...]
    primary_metric: str
    collate: Callable | None  # how a batch's samples become the batch (None: torch's default)

    def check_data(self, cfg: TrainConfig) -> None: ...

    def build_data(self, cfg: TrainConfig) -> DataBundle: ...

    def build_model(self, spec: BackboneSpec, backbone: nn.Module, cfg: TrainConfig, num_classes: int) -> nn.Module:
        ...

    def loss(self, model: nn.Module, images: torch.Tensor, targets, loss_fn: nn.Module
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]: ...


class Classification:
    name, components, primary_metric, collate = "classification", (), "val/acc", None

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

    name, primary_metric = "detection", "val/map"
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


TASKS: dict[str, Task] = {"classification": Classification(), "detection": Detection()}


def task_of(cfg: TrainConfig) -> Task:
    return TASKS[cfg.task]
