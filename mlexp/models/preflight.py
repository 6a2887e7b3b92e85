"""The checks a run passes before torch, timm or MLflow are imported: what the config alone
shows cannot work fails in milliseconds, with the verdict the full path would give."""

from __future__ import annotations

from mlexp.config import TrainConfig
from mlexp.models.catalogue import BackboneSpec, resolve_backbone
from mlexp.models.weight_sources import locate_weights, scratch_weights_error


def preflight(cfg: TrainConfig) -> BackboneSpec | None:
    """Reject, in milliseconds and before torch, timm or MLflow are imported, what the config
    alone shows cannot work: an unknown backbone, a contradicting --init, --weights on a scratch
    backbone, a --weights file that does not exist, or pretrained weights that cannot be had
    (none given, none in the weights folder, none in the hub cache, and the hub offline).

    Call it before importing mlexp.training.run. The weights verdict is locate_weights(download=False),
    the full path's own tree. A resumed run takes its config from the run: not checked here.
    A dry run only resolves the backbone (it loads no weights). Returns the resolved backbone
    (None for a resume), which the run then uses: it is resolved once."""
    if cfg.resume:
        return None
    spec = resolve_backbone(cfg.backbone, cfg.init, cfg.plugins)
    if cfg.dry_run:
        return spec
    if spec.init == "scratch" and cfg.weights:  # as build_backbone decides it
        raise scratch_weights_error(spec)
    if spec.init == "pretrained":
        locate_weights(spec, cfg.weights, download=False, weights_from=cfg.weights_from)
    return spec
