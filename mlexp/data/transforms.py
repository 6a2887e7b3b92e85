"""Image transforms from the backbone's own data config, as timm builds them.

Pretrained weights expect the statistics, interpolation and crop they were trained with, and
these differ between timm models (ResNets use ImageNet's mean and std and bicubic resizing,
many ViTs mean = std = 0.5). So the data config is timm's `resolve_data_config` for the
backbone's pretrained config at the run's `--img-size`, and the transforms are timm's
`create_transform` of it: the same pipeline timm's own train.py would use.

`--train-crop` chooses the training geometry:

- `random-resized`: timm's training pipeline: random-resized crop (scale 0.08-1), flip
  (`--hflip`, default 0.5 here), colour jitter (`--color-jitter`, default 0.4 here), RandAugment
  (`--aa`), random erasing (`--reprob`); validation resizes to img_size / crop_pct and center-crops.
- `resize`: the whole image resized to img_size x img_size, for training and validation;
  for tiny images (the built-in 8x8 `digits`), where a crop would cut the object away. Training
  adds what is asked: RandAugment or colour jitter (default 0 here), flip (default 0 here), erasing.
- `auto` (default): `random-resized` on image folders, `resize` on the built-in sets.

Both geometries rotate training images by up to `--rotate` degrees after their crop or resize
(torchvision's RandomRotation, in the backbone's interpolation, bare corners in its mean colour),
and apply the jitter as torchvision's ColorJitter (brightness, contrast, saturation, hue), which
RandAugment replaces, as in timm. All of these draw from torch's or Python's generator, which
`loading.EpochSeeded` seeds per image.
"""

# Imported where used: `timm` (0.4 s more than torch), because the sweep and tune launchers
# import this module (through mlexp.tasks.kinds) to check configurations, and build no model.
from __future__ import annotations

from functools import lru_cache

from torchvision import transforms

from mlexp.config import TrainConfig
from mlexp.data.stacks import RgbOnly, StackTransform
from mlexp.errors import MlexpError
from mlexp.models.catalogue import resolve_backbone
from mlexp.option_values import DEFAULT_JITTER, geometry, jitter_factors

DEFAULT_HFLIP = {"random-resized": 0.5, "resize": 0.0}


def train_crop(cfg: TrainConfig) -> str:
    """`--train-crop` with `auto` resolved: `random-resized` or `resize`."""
    return geometry(cfg.train_crop, cfg.data)


def hflip(cfg: TrainConfig) -> float:
    """`--hflip`, or its default for the training geometry (flips suit photos, not digits)."""
    return cfg.hflip if cfg.hflip is not None else DEFAULT_HFLIP[train_crop(cfg)]


def color_jitter(cfg: TrainConfig) -> float | str:
    """The jitter training applies: `--color-jitter`, or its default for the training geometry;
    none with RandAugment (`--aa`), which replaces it (timm's rule, kept for resizes too)."""
    if cfg.aa:
        return 0.0
    return cfg.color_jitter if cfg.color_jitter is not None else DEFAULT_JITTER[train_crop(cfg)]


@lru_cache(maxsize=32)
def _data_config(timm_name: str, img_size: int) -> tuple:
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(timm_name)
    resolved = resolve_data_config({"input_size": (3, img_size, img_size)},
                                   pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
    return tuple(sorted(resolved.items()))


def data_config(cfg: TrainConfig) -> dict:
    """timm's data config of the run's backbone at its image size (input_size, interpolation,
    mean, std, crop_pct, crop_mode), plus the resolved training geometry, flip, colour jitter
    (one strength, or B,C,S,H) and rotation: what config.json and the `data.*` params record."""

    resolved = dict(_data_config(resolve_backbone(cfg.backbone, cfg.init, cfg.plugins).timm_name, cfg.img_size))
    return {**{key: list(value) if isinstance(value, tuple) else value for key, value in resolved.items()},
            "train_crop": train_crop(cfg), "hflip": hflip(cfg), "color_jitter": color_jitter(cfg),
            "rotate": cfg.rotate}


def build_transforms(cfg: TrainConfig, train: bool) -> transforms.Compose:
    """The training (`train`) or evaluation transform of the run: see the module docstring."""
    if train:
        check_aa(cfg.aa)
    config = data_config(cfg)
    if cfg.in_chans != 3:  # stacks of N channels: resize, flip, normalise (mlexp.data.stacks)
        return StackTransform(cfg.in_chans, cfg.img_size, config["mean"], config["std"],
                              config["hflip"] if train else 0.0)
    return transforms.Compose([RgbOnly(), *_rgb_pipeline(cfg, config, train).transforms])


def _rgb_pipeline(cfg: TrainConfig, config: dict, train: bool) -> transforms.Compose:
    if config["train_crop"] == "resize":
        return _resize_pipeline(cfg, config, train)
    from timm.data import create_transform

    common = dict(interpolation=config["interpolation"], mean=tuple(config["mean"]), std=tuple(config["std"]),
                  crop_pct=config["crop_pct"], crop_mode=config["crop_mode"])
    if not train:
        return create_transform(cfg.img_size, is_training=False, **common)
    # timm's three stages: the crop and flip, then the colour (RandAugment or jitter), then the
    # tensor; a rotation goes between the first two, as in the resize pipeline.
    crop, colour, final = create_transform(
        cfg.img_size, is_training=True, hflip=config["hflip"], vflip=0.0,
        color_jitter=jitter_factors(config["color_jitter"]), auto_augment=cfg.aa or None, re_prob=cfg.reprob,
        re_mode="pixel", separate=True, **common)
    return transforms.Compose([*crop.transforms, *_rotation(cfg, config), *colour.transforms, *final.transforms])


def _rotation(cfg: TrainConfig, config: dict) -> list:
    """`--rotate`, in the backbone's interpolation; the corners a rotation uncovers take the
    backbone's mean colour, which normalisation turns into zeros, as RandAugment fills them."""
    if not cfg.rotate:
        return []
    return [transforms.RandomRotation(cfg.rotate, interpolation=transforms.InterpolationMode(config["interpolation"]),
                                      fill=[round(255 * m) for m in config["mean"]])]


def _resize_pipeline(cfg: TrainConfig, config: dict, train: bool) -> transforms.Compose:
    """Resize the whole image, then (training only) rotation, RandAugment or colour jitter, and
    flip; normalise; erase."""
    interpolation = transforms.InterpolationMode(config["interpolation"])
    steps: list = [transforms.Resize((cfg.img_size, cfg.img_size), interpolation=interpolation)]
    if train:
        steps += _rotation(cfg, config)
    if train and cfg.aa:
        from timm.data.auto_augment import rand_augment_transform

        steps.append(rand_augment_transform(cfg.aa, {"translate_const": int(cfg.img_size * 0.45),
                                                     "img_mean": tuple(round(255 * m) for m in config["mean"])}))
    elif train and any(jitter_factors(config["color_jitter"])):
        steps.append(transforms.ColorJitter(*jitter_factors(config["color_jitter"])))
    if train and config["hflip"] > 0:
        steps.append(transforms.RandomHorizontalFlip(config["hflip"]))
    steps += [transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])]
    if train and cfg.reprob > 0:
        steps.append(transforms.RandomErasing(p=cfg.reprob, value="random"))
    return transforms.Compose(steps)


def check_aa(policy: str | None) -> None:
    """A `--aa` policy timm would refuse or misread is a user error, found before any run starts
    (timm parses a policy only while building the transform, in the training's loaders)."""
    if not policy:
        return
    if not policy.startswith("rand"):
        raise MlexpError(f"--aa must be a RandAugment policy such as rand-m9-mstd0.5, got {policy!r}")
    # timm skips a section with no number in it (a typo would silently train with the defaults)
    for section in policy.split("-")[1:]:
        if not section.startswith("t") and not any(char.isdigit() for char in section):
            raise MlexpError(f"--aa {policy!r}: section {section!r} means nothing to RandAugment "
                             "(sections look like m9, n2, mstd0.5, inc1)")
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(policy, {})
    except (ValueError, AssertionError, KeyError) as error:
        raise MlexpError(f"--aa {policy!r} is not a valid RandAugment policy ({error})") from None
