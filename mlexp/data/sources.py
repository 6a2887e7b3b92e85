"""Data: the built-in `digits` and `synthetic` sets, ImageFolder trees, and data with splits
of its own (split files, a split manifest, torchvision datasets: mlexp.data.official).

Every source yields 8-bit RGB PIL images (mlexp.data.images), so one transform pipeline
(mlexp.data.transforms: the backbone's own timm data config) serves them all. Splits
(val-split and k-fold) use a fixed split seed, not the training seed: runs that differ only
in `--seed` are evaluated on the same validation images, which is what makes seed-paired
comparisons meaningful.

In an ImageFolder tree, hidden entries (names starting with a dot: `.ipynb_checkpoints`,
`.git`, `.DS_Store`) are never classes or images. `check_data_source` scans the tree once
before any MLflow run exists and rejects what cannot be trained on: missing or empty
folders, fewer than 2 classes, and classes too small for the requested split or folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from mlexp.config import TrainConfig
from mlexp.data.images import (
    IMAGE_EXTENSIONS,
    ArrayImages,
    CheckedImageFolder,
    DataBundle,
    class_files,
    class_folders,
    class_image_counts,
    digits_arrays,
    synthetic_arrays,
)
from mlexp.data.official import check_official, official_bundle
from mlexp.data.splits import check_split, split_indices
from mlexp.data.stacks import is_stack, stack_channels
from mlexp.data.transforms import build_transforms, check_aa
from mlexp.errors import MlexpError
from mlexp.option_values import BUILT_IN


def require_folder(path: Path, what: str) -> None:
    """A data path must be an existing folder; say which of the two it is not."""
    if path.is_dir():
        return
    problem = "is not a folder" if path.exists() else "does not exist"
    raise MlexpError(f"{what} folder {path} {problem}; pass an ImageFolder path (one sub-folder per class), "
                     "'digits' or 'synthetic'")


def _image_folder(path: Path, what: str, in_chans: int) -> CheckedImageFolder:
    require_folder(path, what)
    try:
        folder = CheckedImageFolder(str(path), in_chans=in_chans)
    except FileNotFoundError as error:
        raise MlexpError(f"{what} folder {path} holds no images ({error}); expected one sub-folder "
                         f"per class with {', '.join(IMAGE_EXTENSIONS[:4])} ... files") from None
    if len(folder.classes) < 2:
        raise MlexpError(f"{what} folder {path} has {len(folder.classes)} class folder(s); "
                         "classification needs at least 2 (one sub-folder per class)")
    return folder


def _folder_roots(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The training folder (DATA/train if it exists, else DATA) and the validation folder
    (--val-dir, else DATA/val if it exists, else None: split the training folder)."""
    root = Path(cfg.data).expanduser()
    require_folder(root, "data")
    train_root = root / "train" if (root / "train").is_dir() else root
    if cfg.val_dir:
        return train_root, Path(cfg.val_dir).expanduser()
    return train_root, (root / "val" if (root / "val").is_dir() else None)


def _test_root(cfg: TrainConfig) -> Path | None:
    """--test-dir, else DATA/test when the data folder has one (then --test-split is not needed)."""
    if cfg.test_dir:
        return Path(cfg.test_dir).expanduser()
    data = Path(cfg.data).expanduser()
    # Only beside DATA/train: without it DATA itself is the training folder, and test/ one of its classes.
    return data / "test" if cfg.data not in BUILT_IN and (data / "train").is_dir() and (data / "test").is_dir() else None


def _folder_bundle(cfg: TrainConfig) -> DataBundle:
    train_root, val_root = _folder_roots(cfg)
    train_folder = _image_folder(train_root, "training", cfg.in_chans)
    train_folder.transform = build_transforms(cfg, train=True)
    if val_root is not None:
        val_folder = _image_folder(val_root, "validation", cfg.in_chans)
        if val_folder.classes != train_folder.classes:
            raise MlexpError(f"validation classes {val_folder.classes} differ from training classes "
                             f"{train_folder.classes}")
        val_folder.transform = build_transforms(cfg, train=False)
        train_set, val_set = train_folder, val_folder
    test_root, test_set = _test_root(cfg), None
    held_out = 0.0 if test_root else cfg.test_split  # a test folder wins over a split
    if val_root is None or held_out:
        labels = np.array(train_folder.targets)
        train_idx, val_idx, test_idx = split_indices(labels, cfg, held_out)
        plain = CheckedImageFolder(str(train_root), build_transforms(cfg, train=False), cfg.in_chans)
        if val_root is None:
            val_set = Subset(plain, val_idx)
        else:  # a val folder, and the test split taken from the training folder
            train_idx = np.sort(np.concatenate([train_idx, val_idx]))
        train_set = Subset(train_folder, train_idx)
        test_set = Subset(plain, test_idx) if held_out else None
    if test_root is not None:
        test_folder = _image_folder(test_root, "test", cfg.in_chans)
        if test_folder.classes != train_folder.classes:
            raise MlexpError(f"test classes {test_folder.classes} differ from training classes {train_folder.classes}")
        test_folder.transform = build_transforms(cfg, train=False)
        test_set = test_folder
    return DataBundle(train_set, val_set, len(train_folder.classes), train_folder.classes,
                      Path(cfg.data).expanduser().name, test_set)


def build_data(cfg: TrainConfig) -> DataBundle:
    """The training and validation sets described by `cfg.data`."""
    if cfg.data in ("digits", "synthetic"):
        images, labels = digits_arrays() if cfg.data == "digits" else synthetic_arrays()
        train_idx, val_idx, test_idx = split_indices(labels, cfg, cfg.test_split)
        train_set = ArrayImages(images[train_idx], labels[train_idx], build_transforms(cfg, train=True))
        val_set = ArrayImages(images[val_idx], labels[val_idx], build_transforms(cfg, train=False))
        test_set = (ArrayImages(images[test_idx], labels[test_idx], build_transforms(cfg, train=False))
                    if len(test_idx) else None)
        num_classes = int(labels.max()) + 1
        return DataBundle(train_set, val_set, num_classes, [str(c) for c in range(num_classes)], cfg.data, test_set)
    return official_bundle(cfg) or _folder_bundle(cfg)


def check_channels(root: Path, classes: list[str], in_chans: int) -> None:
    """The first image's channels against --in-chans, before any run exists (each image is
    checked again as it is read)."""
    first = next((path for name in classes for path in class_files(root, name)[0]), None)
    if first is None:
        return
    channels = stack_channels(first) if is_stack(first, in_chans) else 3
    if channels != in_chans:
        raise MlexpError(f"{first} has {channels} channel(s) but --in-chans is {in_chans}: "
                         + (f"train with --in-chans {channels}" if is_stack(first, in_chans) else
                            f"images with {in_chans} channels are stacks (NAME.npy, height x width x channels, "
                            "or a TIFF of bands)"))


def check_data_source(cfg: TrainConfig) -> None:
    """Cheap up-front check (before any MLflow run starts) that the data exists, has at least
    2 non-empty classes, and can be split as asked (see check_split), and that its
    augmentation policy is one RandAugment understands."""
    check_aa(cfg.aa)
    if check_official(cfg):
        return
    if cfg.test_dir:
        if cfg.data in BUILT_IN:
            raise MlexpError(f"--test-dir goes with an image-folder --data, not the built-in {cfg.data!r} "
                             "(use --test-split)")
        require_folder(Path(cfg.test_dir).expanduser(), "test")
    if cfg.data in BUILT_IN:
        if cfg.in_chans != 3:
            raise MlexpError(f"--in-chans {cfg.in_chans}: the built-in {cfg.data!r} images are RGB; give a folder of "
                             f"{cfg.in_chans}-channel stacks (NAME.npy)")
        labels = (digits_arrays() if cfg.data == "digits" else synthetic_arrays())[1]
        check_split({str(c): int(n) for c, n in enumerate(np.bincount(labels))}, cfg, f"--data {cfg.data}")
        return
    train_root, val_root = _folder_roots(cfg)
    train_counts = _checked_counts(train_root, "training")
    check_channels(train_root, class_folders(train_root), cfg.in_chans)
    if val_root is None:
        check_split(train_counts, cfg, str(train_root))
        return
    if cfg.folds:  # k folds of what? Each would train and validate on these same two folders
        raise MlexpError(f"--folds {cfg.folds} splits one pool of images into folds, but {val_root} is a separate "
                         "validation folder: every fold would train and validate on the same images; drop --folds "
                         "(one split: the two folders), or put all images in one folder for k-fold")
    require_folder(val_root, "validation")
    val_counts = _checked_counts(val_root, "validation")
    if sorted(val_counts) != sorted(train_counts):
        raise MlexpError(f"validation classes {sorted(val_counts)} differ from training classes "
                         f"{sorted(train_counts)}")


def _checked_counts(root: Path, what: str) -> dict[str, int]:
    """Images per class of an ImageFolder tree; MlexpError unless >= 2 classes, none empty."""
    counts = class_image_counts(root)
    if not sum(counts.values()):
        raise MlexpError(f"{what} folder {root} holds no images; expected one sub-folder per class "
                         f"with {', '.join(IMAGE_EXTENSIONS[:4])} ... files")
    if len(counts) < 2:
        raise MlexpError(f"{what} folder {root} has {len(counts)} class folder(s); "
                         "classification needs at least 2 (one sub-folder per class)")
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise MlexpError(f"class folder {root / empty[0]} holds no images ({len(empty)} empty class "
                         f"folder(s)); add images or remove the folder")
    return counts


