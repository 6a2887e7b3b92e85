"""A detector over any mlexp backbone: the backbone as timm's multi-scale feature extractor
(`features_only`), a feature pyramid (torchvision's FPN) on its last levels, and torchvision's
Faster R-CNN heads.

The backbone is built the way a classifier is (mlexp.models.build: the same weight sources,
load report and scratch initialisation), then its weights move into the feature extractor:
every tensor but the classifier's."""

from __future__ import annotations

import re
from collections import OrderedDict

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mlexp.data.stacks import repeated
from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec

# Narrower than torchvision's COCO defaults (256 pyramid channels, a 1024-wide box head): these
# detectors learn from hundreds or thousands of images, and train on CPUs too.
PYRAMID_CHANNELS = 128
BOX_HEAD_WIDTH = 512
# Proposals sampled per image to train the box head: a quarter of torchvision's 512 (COCO has
# ~7 objects an image); the head's cost falls 4x and the 1:3 positive share stays.
BOX_SAMPLES_PER_IMAGE = 128
PYRAMID_LEVELS = 3  # the backbone's deepest three (strides 8, 16, 32 on a ResNet), plus a pooled one


class PyramidBackbone(nn.Module):
    """timm features (a list) -> torchvision's FPN (an OrderedDict, as its detectors expect)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.body = features
        self.fpn = FeaturePyramidNetwork(features.feature_info.channels(), PYRAMID_CHANNELS,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = PYRAMID_CHANNELS

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.body(images)
        return self.fpn(OrderedDict((str(index), level) for index, level in enumerate(levels)))


class Detector(FasterRCNN):
    """torchvision's Faster R-CNN, telling mlexp's strategies which part is the backbone: its
    heads (the feature pyramid, the RPN, the box head) are what a classifier's head is to them
    (`--strategy linear` trains them alone), and the backbone's own stages, bottom to top, are
    the groups of layer-wise LR decay and gradual unfreezing (which opens the top stage second)."""

    def get_classifier(self) -> list[nn.Module]:
        return [self.backbone.fpn, self.rpn, self.roi_heads]

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        stages = [name for name, _ in self.backbone.body.named_children()]
        return {name: rf"^backbone\.body\.{re.escape(name)}(?:\.|$)" for name in stages}


def feature_extractor(spec: BackboneSpec, classifier: nn.Module, img_size: int) -> nn.Module:
    """The backbone's last PYRAMID_LEVELS feature maps, with the classifier's weights (all but its head)."""
    try:
        probe = timm.create_model(spec.timm_name, pretrained=False, features_only=True, **spec.create_kwargs(img_size))
        levels = len(probe.feature_info.channels())
        features = timm.create_model(spec.timm_name, pretrained=False, features_only=True,
                                     out_indices=tuple(range(levels - PYRAMID_LEVELS, levels)),
                                     **spec.create_kwargs(img_size))
    except (RuntimeError, TypeError, ValueError, AssertionError) as error:
        raise MlexpError(f"{spec.name} cannot serve as a detector's backbone (timm features_only: {error})") from None
    missing, _ = features.load_state_dict(classifier.state_dict(), strict=False)
    if missing:
        raise MlexpError(f"{spec.name}: the feature extractor has {len(missing)} tensor(s) the classifier lacks "
                         f"({', '.join(missing[:3])} ...)")
    return features


def build_detector(spec: BackboneSpec, classifier: nn.Module, num_classes: int, img_size: int,
                   in_chans: int = 3) -> Detector:
    """Faster R-CNN for `num_classes` classes (plus background), sized for `img_size` inputs.

    Anchors: one size per pyramid level, 4x its stride (32 px at stride 8), three aspect ratios;
    min_size = max_size = img_size, or torchvision would upscale every image to 800 px."""
    backbone = PyramidBackbone(feature_extractor(spec, classifier, img_size))
    strides = backbone.body.feature_info.reduction()
    sizes = tuple((4 * stride,) for stride in [*strides, 2 * strides[-1]])
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    pooler = MultiScaleRoIAlign(featmap_names=[str(n) for n in range(len(strides))], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(PYRAMID_CHANNELS * 7 * 7, BOX_HEAD_WIDTH)
    return Detector(backbone, rpn_anchor_generator=anchors, box_roi_pool=pooler, box_head=box_head,
                      box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, num_classes + 1),
                      box_batch_size_per_image=BOX_SAMPLES_PER_IMAGE,
                      min_size=img_size, max_size=img_size,
                      # torchvision's ImageNet mean and std, over --in-chans channels as the stem's filters are
                      image_mean=repeated(IMAGENET_MEAN, in_chans).flatten().tolist(),
                      image_std=repeated(IMAGENET_STD, in_chans).flatten().tolist())
