"""Data: the built-in `digits` and `synthetic` sets, ImageFolder trees, splits and transforms.

Every source yields 8-bit RGB PIL images, so one transform pipeline (mlexp.data.transforms: the
backbone's own timm data config) serves them all; `load_rgb_image` brings any image file
(16-bit, float, palette, with alpha, ...) there by its real range. Splits (val-split and
k-fold) use a fixed split seed, not the training seed: runs that differ only in `--seed`
are evaluated on the same validation images, which is what makes seed-paired comparisons
meaningful.

In an ImageFolder tree, hidden entries (names starting with a dot: `.ipynb_checkpoints`,
`.git`, `.DS_Store`) are never classes or images. `check_data_source` scans the tree once
before any MLflow run exists and rejects what cannot be trained on: missing or empty
folders, fewer than 2 classes, and classes too small for the requested split or folds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from mlexp.config import TrainConfig
from mlexp.data.transforms import build_transforms, check_aa
from mlexp.data_options import BUILT_IN
from mlexp.errors import MlexpError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Transparent pixels have no colour of their own (what RGBA stores under alpha 0 is often
# black or garbage), so images with alpha are flattened onto one fixed background.
ALPHA_BACKGROUND = (255, 255, 255)
from mlexp.data.splits import SPLIT_SEED, check_split, split_indices


@dataclass
class DataBundle:
    """What the training run needs to know about its data."""

    train_set: Dataset
    val_set: Dataset
    num_classes: int
    class_names: list[str]
    name: str  # logged as the mlexp.dataset tag
    test_set: Dataset | None = None  # --test-split or DATA/test; evaluated once, with the best weights


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


def is_hidden(name: str) -> bool:
    """Dot-names (.git, .ipynb_checkpoints, .DS_Store, ._x.png) are tool metadata, not data."""
    return name.startswith(".")


def is_visible_image(relative_path: str) -> bool:
    """An image file, none of whose path parts (below the folder root) is hidden."""
    parts = Path(relative_path).parts
    return bool(parts) and not any(is_hidden(part) for part in parts) \
        and relative_path.lower().endswith(IMAGE_EXTENSIONS)


def _is_image_under(root: str, path: str) -> bool:
    return is_visible_image(os.path.relpath(path, root))


def class_folders(root: Path) -> list[str]:
    """The class names of an ImageFolder tree: its sub-folders that are not hidden, sorted."""
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and not is_hidden(entry.name))


def class_image_counts(root: Path) -> dict[str, int]:
    """Images per class, found by the same rule CheckedImageFolder uses (symlinks followed)."""
    counts = {}
    for name in class_folders(root):
        count = 0
        for folder, subfolders, files in os.walk(root / name, followlinks=True):
            subfolders[:] = [d for d in subfolders if not is_hidden(d)]  # never descend into .git
            count += sum(1 for f in files if _is_image_under(str(root), os.path.join(folder, f)))
        counts[name] = count
    return counts


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, by its real range rather than PIL's clipping.

    PIL's convert("RGB") clips 16-bit and 32-bit values to 255 (a 0..65535 gradient comes out
    almost all white). Such files do not say how many bits they use (12-bit sensors write
    16-bit files), so each image's own min..max is stretched to 0..255, which keeps 256 grey
    levels where dividing by 257 would leave a 12-bit image 16. Images with transparency are
    flattened onto ALPHA_BACKGROUND; everything else (L, 1, P, CMYK, YCbCr) is PIL's convert."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64)
        finite = pixels[np.isfinite(pixels)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        pixels = np.nan_to_num(pixels, nan=low, posinf=high, neginf=low)
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
    # Alpha modes, or a palette/L/RGB image with a transparent colour (what Pillow 10.1's
    # has_transparency_data tests; spelled out for Pillow 10.0).
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb_image(path: str) -> Image.Image:
    """The ImageFolder loader: read the file, close it, return it as 8-bit RGB (to_rgb8)."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    return to_rgb8(image)


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that skips hidden folders and files, loads every image mode as 8-bit RGB,
    and turns unreadable files into a user error naming the file."""

    def __init__(self, root: str | Path, transform=None):
        root = os.path.expanduser(str(root))
        # A partial, not a lambda: DataLoader workers may need to pickle the dataset.
        super().__init__(root, transform=transform, loader=load_rgb_image,
                         is_valid_file=partial(_is_image_under, root))

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}

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


def require_folder(path: Path, what: str) -> None:
    """A data path must be an existing folder; say which of the two it is not."""
    if path.is_dir():
        return
    problem = "is not a folder" if path.exists() else "does not exist"
    raise MlexpError(f"{what} folder {path} {problem}; pass an ImageFolder path (one sub-folder per class), "
                     "'digits' or 'synthetic'")


def _image_folder(path: Path, what: str) -> CheckedImageFolder:
    require_folder(path, what)
    try:
        folder = CheckedImageFolder(str(path))
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
    train_folder = _image_folder(train_root, "training")
    train_folder.transform = build_transforms(cfg, train=True)
    if val_root is not None:
        val_folder = _image_folder(val_root, "validation")
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
        plain = CheckedImageFolder(str(train_root), transform=build_transforms(cfg, train=False))
        if val_root is None:
            val_set = Subset(plain, val_idx)
        else:  # a val folder, and the test split taken from the training folder
            train_idx = np.sort(np.concatenate([train_idx, val_idx]))
        train_set = Subset(train_folder, train_idx)
        test_set = Subset(plain, test_idx) if held_out else None
    if test_root is not None:
        test_folder = _image_folder(test_root, "test")
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
    return _folder_bundle(cfg)


def check_data_source(cfg: TrainConfig) -> None:
    """Cheap up-front check (before any MLflow run starts) that the data exists, has at least
    2 non-empty classes, and can be split as asked (see check_split), and that its
    augmentation policy is one RandAugment understands."""
    check_aa(cfg.aa)
    if cfg.test_dir:
        if cfg.data in BUILT_IN:
            raise MlexpError(f"--test-dir goes with an image-folder --data, not the built-in {cfg.data!r} "
                             "(use --test-split)")
        require_folder(Path(cfg.test_dir).expanduser(), "test")
    if cfg.data in BUILT_IN:
        labels = (digits_arrays() if cfg.data == "digits" else synthetic_arrays())[1]
        check_split({str(c): int(n) for c, n in enumerate(np.bincount(labels))}, cfg, f"--data {cfg.data}")
        return
    train_root, val_root = _folder_roots(cfg)
    train_counts = _checked_counts(train_root, "training")
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


