"""A detector's score on a split: COCO's mAPs (mlexp.tasks.detection.metrics) over every
image of it, each process's detections gathered first."""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mlexp.tasks.detection.annotations import read_split
from mlexp.tasks.detection.images import DetectionImages, collate
from mlexp.tasks.detection.metrics import as_metric_inputs, map_results, new_map_metric


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, loader, accelerator: Accelerator | None,
                      class_names: list[str]) -> tuple[dict[str, float], list[dict]]:
    """({"map", "map_50", "map_75"}, one row per class with its AP). accelerator None: one process,
    no mixed precision (a logged model, as it loads)."""
    model.eval()
    metric = new_map_metric()
    for images, targets in loader:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            detections = model(images)
        predictions, truths = as_metric_inputs(detections, targets)
        # boxes per image differ: gathered as objects, not tensors, and the images the sampler
        # repeated to even out the ranks' last batches dropped: each image counts once
        if accelerator is not None and accelerator.num_processes > 1:
            predictions = accelerator.gather_for_metrics(predictions, use_gather_object=True)
            truths = accelerator.gather_for_metrics(truths, use_gather_object=True)
        metric.update(predictions, truths)
    return map_results(metric, class_names)


def detection_folder(root, img_size: int, in_chans: int, bands: tuple[str, ...] = ()):
    """(a COCO or YOLO folder's images, with their band folders, as a detector takes them; the
    class names its annotations use)."""
    split = read_split(root, bands)
    return DetectionImages(split.images, img_size, root=root, in_chans=in_chans), split.class_names


def evaluate_detector_on(model: torch.nn.Module, images, class_names: list[str], batch_size: int = 8
                         ) -> tuple[dict[str, float], list[dict]]:
    """A detector (on the CPU, as a logged model loads) over a folder's images: its mAPs and each class's AP."""
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, collate_fn=collate)
    return evaluate_detector(model, loader, None, class_names)
