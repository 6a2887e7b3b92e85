"""MiT backbones (the Mix Transformer encoders of SegFormer, mit_b0 ... mit_b5), which timm
does not ship, from segmentation-models-pytorch's encoders (the `mit` extra).

mlexp offers them through the same route as a user's own network (mlexp.models.plugins): its
own package names these factories as `mlexp.backbones` entry points, so `--backbone mit_b0`
works wherever a timm name does, scratch offline, pretrained from a weights file
(`weights/mit_b0.safetensors`, the classifier's state dict). A classifier is the encoder, a
global average pool of its last stage and a linear head; a detector (`--task detection`)
takes the encoder's four stages (strides 4 to 32) as its feature pyramid, with the same
parameter names, so a classifier's weights load into it.
"""

# Imported where used: `segmentation_models_pytorch` (the mit extra: without it, one line says
# how to install it).
from __future__ import annotations

import torch
from timm.models._features import FeatureInfo
from torch import nn

from mlexp.errors import MlexpError

STRIDES = (4, 8, 16, 32)  # the encoder's four stages


def _encoder(name: str, in_chans: int) -> nn.Module:
    try:
        from segmentation_models_pytorch.encoders import get_encoder
    except ImportError:
        raise MlexpError(f"--backbone {name} needs segmentation-models-pytorch: pip install 'mlexp[mit]'") from None
    return get_encoder(name, in_channels=in_chans, depth=5, weights=None)  # weights: mlexp's own sources


def _stages(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The four stages' maps (smp also returns the input and an empty stride-2 placeholder)."""
    return encoder(x)[2:]


class MiTClassifier(nn.Module):
    def __init__(self, name: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.encoder = _encoder(name, in_chans)
        self.num_features = self.encoder.out_channels[-1]
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return _stages(self.encoder, x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.drop(x.mean((2, 3)))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


class MiTFeatures(nn.Module):
    """The stages `out_indices` picks, as timm's `features_only` models give them."""

    def __init__(self, name: str, in_chans: int = 3, out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.encoder = _encoder(name, in_chans)
        channels = self.encoder.out_channels[2:]
        self.out_indices = tuple(out_indices) if out_indices is not None else tuple(range(len(STRIDES)))
        self.feature_info = FeatureInfo([{"num_chs": c, "reduction": s, "module": f"stage{n}"}
                                         for n, (c, s) in enumerate(zip(channels, STRIDES))], self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = _stages(self.encoder, x)
        return [stages[index] for index in self.out_indices]


def _factory(name: str):
    def build(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, features_only: bool = False,
              out_indices: tuple[int, ...] | None = None) -> nn.Module:
        if features_only:
            return MiTFeatures(name, in_chans, out_indices)
        return MiTClassifier(name, num_classes, in_chans, drop_rate)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: the MiT encoder of segmentation-models-pytorch, as a classifier or a feature pyramid."
    return build


mit_b0, mit_b1, mit_b2, mit_b3, mit_b4, mit_b5 = (_factory(f"mit_b{n}") for n in range(6))
