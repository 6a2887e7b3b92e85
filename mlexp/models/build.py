"""Building a resolved backbone: the randomly initialised network, or the network with its
pretrained weights located (`weight_sources`) and loaded with every tensor checked
(`weight_files`), plus where those weights came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import timm

from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec
from mlexp.models.weight_files import LoadReport, load_weights
from mlexp.models.weight_sources import WeightsFile, locate_weights, scratch_weights_error

if TYPE_CHECKING:
    import torch


@dataclass
class BuiltModel:
    """A backbone with its classifier, plus where its starting weights came from."""

    model: torch.nn.Module
    weights_source: str  # "none" (scratch) | "file" | "mlflow-run" | "mlflow-model" | "weights-dir" | "timm"
    weights_path: str | None  # the local file actually read
    weights_sha256: str | None
    loaded_tensors: int  # how many tensors came from the weights
    load_report: LoadReport | None = None  # which ones, which stayed new, which in the file went unused


def create_model(spec: BackboneSpec, num_classes: int, img_size: int) -> torch.nn.Module:
    """The randomly initialised network (timm never downloads here: finding weights is mlexp.models.weight_sources' job)."""
    kwargs = spec.create_kwargs(img_size)
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise MlexpError(f"cannot build {spec.name} (timm {spec.timm_name}, {kwargs}) for "
                         f"{num_classes} classes at {img_size} px: {exc}") from exc


def build_backbone(spec: BackboneSpec, num_classes: int, img_size: int, weights: str | WeightsFile | None = None,
                   strict: bool = True, key_map: str | None = None) -> BuiltModel:
    """Build the model; for pretrained specs, find and load verified weights (or fail fast).

    `weights` is what the user typed (--weights), or a WeightsFile from an earlier
    `locate_weights(spec, ...)` (to fail before opening a run without downloading twice);
    `strict` and `key_map`: --weights-strict and --weights-key-map."""
    if spec.init == "scratch":
        if weights:
            raise scratch_weights_error(spec)
        return BuiltModel(create_model(spec, num_classes, img_size), "none", None, None, 0)
    # Find the weights before building: a missing file fails in milliseconds, not after a build.
    found = weights if isinstance(weights, WeightsFile) else locate_weights(spec, weights)
    model = create_model(spec, num_classes, img_size)
    report = load_weights(model, found.path, spec.timm_name, found.label, strict, key_map)
    return BuiltModel(model, found.source, str(found.path), found.sha256, len(report.loaded), report)
