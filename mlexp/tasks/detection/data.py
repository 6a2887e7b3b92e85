"""A detection run's splits, as a classification run has them: DATA/train, DATA/val and
DATA/test folders (each COCO or YOLO), one folder split by --val-split / --test-split /
--folds with the same fixed split seed (images are not stratified: an image holds several
classes), or a split manifest's fold (--splits FILE --fold N: the images it lists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Subset

from mlexp.config import TrainConfig
from mlexp.data.images import DataBundle
from mlexp.data.splits import split_indices
from mlexp.data.stacks import channels_of
from mlexp.errors import MlexpError
from mlexp.tasks.detection.annotations import DetectionSplit, is_detection_folder, read_split
from mlexp.tasks.detection.images import DetectionImages, read_pixels


def detection_splits(cfg: TrainConfig) -> tuple[DetectionSplit, DetectionSplit | None, DetectionSplit | None]:
    """Every split's annotations, read and checked (a malformed one names its file and line)."""
    root = Path(cfg.data)
    if not root.is_dir() or not is_detection_folder(root):
        raise MlexpError(f"--task detection reads a folder with annotations.json (COCO) or images/ and labels/ "
                         f"(YOLO), or train/ and val/ folders of them; {root} is not one")
    bands = band_names(cfg)
    if cfg.splits:
        return listed_splits(cfg, root, bands)
    if (root / "train").is_dir():
        train = read_split(root / "train", bands)
        val = read_split(root / "val", bands) if (root / "val").is_dir() else None
        test = read_split(root / "test", bands) if (root / "test").is_dir() else None
    else:
        train, val, test = read_split(root, bands), None, None
    for other in (val, test):
        if other is not None and other.class_names != train.class_names:
            raise MlexpError(f"the splits of {root} name different classes: {train.class_names} and "
                             f"{other.class_names}")
    check_channels(train, cfg.in_chans)
    return train, val, test


def listed_splits(cfg: TrainConfig, root: Path, bands: tuple[str, ...]
                  ) -> tuple[DetectionSplit, DetectionSplit, DetectionSplit | None]:
    """A split manifest's fold (--splits FILE --fold N) over one annotated folder: exactly the
    images it lists (paths relative to --data) in each of train, val and test."""
    from mlexp.data.official import check_official_split, official_folds  # here: only a manifest needs them
    from mlexp.data.partitions import read_manifest

    if (root / "train").is_dir():
        raise MlexpError(f"--splits lists the images of one annotated folder, and {root} has a train/ folder (a "
                         "split of its own): drop --splits, or pass the folder the manifest's paths are under")
    check_official_split(cfg, official_folds(cfg))
    partition = read_manifest(Path(cfg.splits).expanduser(), root, cfg.fold, need_class=False)
    every = read_split(root, bands)
    inside = root.resolve()
    annotated = {item.path.resolve().relative_to(inside).as_posix(): item for item in every.images
                 if item.path.resolve().is_relative_to(inside)}  # a COCO file_name elsewhere cannot be listed
    chosen = {}
    for context, rows in partition.members.items():
        unknown = [path for path, _ in rows if path not in annotated]
        if unknown:
            raise MlexpError(f"{partition.source}: {unknown[0]} is listed in {context} of fold {cfg.fold} but is "
                             f"not an annotated image of {root}")
        chosen[context] = DetectionSplit([annotated[path] for path, _ in rows], every.class_names)
    check_channels(chosen["train"], cfg.in_chans)
    return chosen["train"], chosen["val"], chosen.get("test")


def band_names(cfg_or_text: TrainConfig | str | None) -> tuple[str, ...]:
    """--bands as folder names ("depth, thermal" -> ("depth", "thermal")), of a config or as typed."""
    text = cfg_or_text.bands if isinstance(cfg_or_text, TrainConfig) else cfg_or_text
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def check_channels(split: DetectionSplit, in_chans: int) -> None:
    """The first image (with its bands) has --in-chans channels: else one line before any run.
    A picture in a 3-channel run has them whatever its mode (greyscale, RGBA: made RGB as read)."""
    if not split.images:
        return
    first = split.images[0]
    pixels = read_pixels(first, in_chans)
    found = 3 if in_chans == 3 and isinstance(pixels, Image.Image) else channels_of(pixels).shape[-1]
    if found != in_chans:
        bands = f" with its bands ({', '.join(str(path) for path in first.bands)})" if first.bands else ""
        raise MlexpError(f"{first.path}{bands} has {found} channel(s) but --in-chans is {in_chans}")


def detection_bundle(cfg: TrainConfig) -> DataBundle:
    train, val, test = detection_splits(cfg)

    def dataset(split) -> DetectionImages:
        return DetectionImages(split.images, cfg.img_size, root=Path(cfg.data), in_chans=cfg.in_chans)

    images = dataset(train)
    if val is None:
        train_idx, val_idx, test_idx = split_indices(np.zeros(len(images), dtype=int), cfg,
                                                     test_split=cfg.test_split if test is None else 0.0)
        train_set, val_set = Subset(images, train_idx), Subset(images, val_idx)
        test_set = Subset(images, test_idx) if len(test_idx) else None
    else:
        train_set, val_set, test_set = images, dataset(val), None
    if test is not None:
        test_set = dataset(test)
    return DataBundle(train_set, val_set, len(train.class_names), train.class_names, Path(cfg.data).name, test_set)

