"""Data: the built-in `digits` and `synthetic` sets, ImageFolder trees, splits and transforms.

Every source yields PIL images, so one transform pipeline (resize, RandAugment, flip,
normalise, random erasing) serves them all. Splits (val-split and k-fold) use a fixed
split seed, not the training seed: runs that differ only in `--seed` are evaluated on the
same validation images, which is what makes seed-paired comparisons meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError

SPLIT_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataBundle:
    """What the training run needs to know about its data."""

    train_set: Dataset
    val_set: Dataset
    num_classes: int
    class_names: list[str]
    name: str  # logged as the mlexp.dataset tag


class ArrayImages(Dataset):
    """Images held in memory as uint8 arrays (H, W) or (H, W, 3), with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable files raise a user error naming the file."""

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        try:
            return super().__getitem__(index)
        except (OSError, ValueError) as error:
            raise MlexpError(f"cannot read image {path} ({error}); fix or remove the file") from None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 handwritten digits (offline), as uint8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return images, digits.target.astype(np.int64)


def synthetic_arrays(num_classes: int = 10, per_class: int = 64, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: each class a coloured bar at its own angle, plus noise."""
    rng = np.random.default_rng(SPLIT_SEED)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    images, labels = [], []
    for label in range(num_classes):
        angle = np.pi * label / num_classes
        bar = np.abs(np.cos(angle) * yy - np.sin(angle) * xx) < 0.12
        colour = rng.uniform(80, 255, size=3)
        for _ in range(per_class):
            noise = rng.normal(0, 40, size=(size, size, 3))
            image = np.clip(bar[..., None] * colour + noise + 40, 0, 255)
            images.append(image.astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def build_transforms(cfg: TrainConfig, train: bool) -> transforms.Compose:
    """Resize, then (training only) RandAugment and flips, normalise, random erasing."""
    steps: list = [transforms.Resize((cfg.img_size, cfg.img_size))]
    if train and cfg.aa:
        from timm.data.auto_augment import rand_augment_transform

        if not cfg.aa.startswith("rand"):
            raise MlexpError(f"--aa must be a RandAugment policy such as rand-m9-mstd0.5, got {cfg.aa!r}")
        try:
            steps.append(rand_augment_transform(cfg.aa, {"translate_const": int(cfg.img_size * 0.45),
                                                         "img_mean": (124, 116, 104)}))
        except (ValueError, AssertionError, KeyError) as error:
            raise MlexpError(f"--aa {cfg.aa!r} is not a valid RandAugment policy ({error})") from None
    if train and cfg.hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(cfg.hflip))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and cfg.reprob > 0:
        steps.append(transforms.RandomErasing(p=cfg.reprob, value="random"))
    return transforms.Compose(steps)


def split_indices(labels: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: the chosen k-fold, else a stratified val-split."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    indices = np.arange(len(labels))
    if cfg.folds:
        folds = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=SPLIT_SEED)
        train_idx, val_idx = list(folds.split(indices, labels))[cfg.fold]
        return train_idx, val_idx
    train_idx, val_idx = train_test_split(indices, test_size=cfg.val_split, stratify=labels,
                                          random_state=SPLIT_SEED)
    return np.sort(train_idx), np.sort(val_idx)


def _image_folder(path: Path, what: str) -> CheckedImageFolder:
    if not path.is_dir():
        raise MlexpError(f"{what} folder {path} does not exist; pass an ImageFolder path "
                         "(one sub-folder per class), 'digits' or 'synthetic'")
    try:
        folder = CheckedImageFolder(str(path))
    except FileNotFoundError as error:
        raise MlexpError(f"{what} folder {path} holds no images ({error}); expected one sub-folder "
                         f"per class with {', '.join(IMAGE_EXTENSIONS[:4])} ... files") from None
    if len(folder.classes) < 2:
        raise MlexpError(f"{what} folder {path} has {len(folder.classes)} class folder(s); "
                         "classification needs at least 2 (one sub-folder per class)")
    return folder


def _folder_bundle(cfg: TrainConfig) -> DataBundle:
    root = Path(cfg.data).expanduser()
    if not root.is_dir():
        raise MlexpError(f"data folder {root} does not exist; pass an ImageFolder path, 'digits' or 'synthetic'")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = Path(cfg.val_dir).expanduser() if cfg.val_dir else (root / "val" if (root / "val").is_dir() else None)
    train_folder = _image_folder(train_root, "training")
    train_folder.transform = build_transforms(cfg, train=True)
    if val_root is not None:
        val_folder = _image_folder(val_root, "validation")
        if val_folder.classes != train_folder.classes:
            raise MlexpError(f"validation classes {val_folder.classes} differ from training classes "
                             f"{train_folder.classes}")
        val_folder.transform = build_transforms(cfg, train=False)
        train_set, val_set = train_folder, val_folder
    else:
        labels = np.array(train_folder.targets)
        train_idx, val_idx = split_indices(labels, cfg)
        val_folder = CheckedImageFolder(str(train_root), transform=build_transforms(cfg, train=False))
        train_set, val_set = Subset(train_folder, train_idx), Subset(val_folder, val_idx)
    return DataBundle(train_set, val_set, len(train_folder.classes), train_folder.classes, root.name)


def build_data(cfg: TrainConfig) -> DataBundle:
    """The training and validation sets described by `cfg.data`."""
    if cfg.data in ("digits", "synthetic"):
        images, labels = digits_arrays() if cfg.data == "digits" else synthetic_arrays()
        train_idx, val_idx = split_indices(labels, cfg)
        train_set = ArrayImages(images[train_idx], labels[train_idx], build_transforms(cfg, train=True))
        val_set = ArrayImages(images[val_idx], labels[val_idx], build_transforms(cfg, train=False))
        num_classes = int(labels.max()) + 1
        return DataBundle(train_set, val_set, num_classes, [str(c) for c in range(num_classes)], cfg.data)
    return _folder_bundle(cfg)


def check_data_source(cfg: TrainConfig) -> None:
    """Cheap up-front check (before any MLflow run starts) that the data exists."""
    if cfg.data in ("digits", "synthetic"):
        return
    root = Path(cfg.data).expanduser()
    if not root.is_dir():
        raise MlexpError(f"data folder {root} does not exist; pass an ImageFolder path, 'digits' or 'synthetic'")
    if cfg.val_dir and not Path(cfg.val_dir).expanduser().is_dir():
        raise MlexpError(f"validation folder {cfg.val_dir} does not exist")


def loader_kwargs(cfg: TrainConfig) -> dict:
    return {"batch_size": cfg.batch_size, "num_workers": cfg.workers,
            "persistent_workers": cfg.workers > 0, "pin_memory": torch.cuda.is_available()}
