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

import gc
import math
import os
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from mlexp.config import TrainConfig
from mlexp.data.transforms import BUILT_IN, build_transforms, check_aa
from mlexp.errors import MlexpError

SPLIT_SEED = 0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Transparent pixels have no colour of their own (what RGBA stores under alpha 0 is often
# black or garbage), so images with alpha are flattened onto one fixed background.
ALPHA_BACKGROUND = (255, 255, 255)


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


def split_indices(labels: np.ndarray, cfg: TrainConfig, test_split: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices. The test part (`test_split` of the data, stratified)
    is held out first, with the fixed split seed: the same images for every seed and fold.
    The rest is split as asked: the chosen k-fold, else a stratified val-split."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    indices = np.arange(len(labels))
    test_idx = np.array([], dtype=int)
    if test_split > 0:
        try:
            indices, test_idx = train_test_split(indices, test_size=test_split, stratify=labels,
                                                 random_state=SPLIT_SEED)
        except ValueError as error:  # too few images per class for a stratified split
            raise MlexpError(f"--test-split {test_split} cannot hold out a stratified test set from "
                             f"{len(labels)} images: {error}") from None
        indices, test_idx = np.sort(indices), np.sort(test_idx)
    rest = labels[indices]
    if cfg.folds:
        folds = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=SPLIT_SEED)
        train_idx, val_idx = list(folds.split(indices, rest))[cfg.fold]
        return indices[train_idx], indices[val_idx], test_idx
    train_idx, val_idx = train_test_split(np.arange(len(indices)), test_size=cfg.val_split, stratify=rest,
                                          random_state=SPLIT_SEED)
    return np.sort(indices[train_idx]), np.sort(indices[val_idx]), test_idx


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


def check_split(counts: dict[str, int], cfg: TrainConfig, where: str) -> None:
    """Reject, with the class and its count, what split_indices' scikit-learn splitters refuse
    or do badly. k-fold: every class needs >= K images (StratifiedKFold otherwise leaves a class
    out of some validation folds, or fails). val-split, train_test_split(stratify=...)'s own
    rules: every class >= 2 images, and both parts (ceil(val_split * n) held out, the rest
    trained on) at least as large as the number of classes."""
    folder = cfg.data not in BUILT_IN
    name, smallest = min(counts.items(), key=lambda item: item[1])
    if cfg.folds:
        if smallest < cfg.folds:
            fixes = [f"lower --folds to {smallest}"] if smallest >= 2 else []  # --folds 1 is no k-fold
            fixes += [f"add images to {name!r}", "pass --val-dir"] if folder else []
            raise MlexpError(f"class {name!r} in {where} has {smallest} image(s), too few for --folds "
                             f"{cfg.folds} (each class needs at least one image per fold"
                             f"{_others(counts, cfg.folds)}); {_either(fixes)}")
        return
    total, classes = sum(counts.values()), len(counts)
    held_out = math.ceil(cfg.val_split * total)  # scikit-learn's own rounding
    kept = total - held_out
    if smallest < 2:
        raise MlexpError(f"class {name!r} in {where} has {smallest} image, too few for a --val-split "
                         f"(a stratified split needs at least 2 per class: one to train on, one to "
                         f"validate{_others(counts, 2)}); add images to {name!r} or pass --val-dir "
                         f"with a separate validation folder")
    if kept < classes:
        raise MlexpError(f"--val-split {cfg.val_split} keeps {kept} of {total} images in {where} for "
                         f"training, fewer than its {classes} classes; lower --val-split"
                         + (", add images, or pass --val-dir" if folder else ""))
    if held_out < classes:
        raise MlexpError(f"--val-split {cfg.val_split} holds out {held_out} of {total} images in "
                         f"{where}, fewer than its {classes} classes (a stratified split needs one "
                         f"per class); raise --val-split" + (", add images, or pass --val-dir" if folder else ""))


def _others(counts: dict[str, int], needed: int) -> str:
    """"; N other class(es) have fewer than K too" when the named class is not the only one."""
    others = sum(1 for count in counts.values() if count < needed) - 1
    return f"; {others} other class(es) have fewer than {needed} too" if others else ""


def _either(fixes: list[str]) -> str:
    return fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])}, or {fixes[-1]}"


PREFETCH_BATCHES = 2  # per worker: enough to hide one slow image, without holding many batches


def loader_kwargs(cfg: TrainConfig, workers: int) -> dict:
    """Batches for an accelerator: `workers` decoding processes that live for the whole run
    (no re-fork each epoch), pinned memory on a GPU so copies can overlap compute."""
    kwargs = {"batch_size": cfg.batch_size, "num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        keep_inherited_objects_from_the_workers_collector()
        kwargs |= {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES}
    return kwargs


@cache  # once per process: each registration would run at every fork
def keep_inherited_objects_from_the_workers_collector() -> None:
    """Loader workers are forked while the tracker's threads work in SQLite (the outbox, an
    sqlite:// store). A worker whose garbage collector finalized a connection it inherited
    would take SQLite's memory lock, which one of those threads may have held at the instant
    of the fork, and wait forever: the training would stall on its first batch. So everything
    alive at a fork is moved out of the collector's reach just before it (gc.freeze): the
    child never collects it, and the parent takes it back right after (gc.unfreeze; both
    are O(1) list splices). The child's own objects are collected as usual."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=gc.freeze, after_in_parent=gc.unfreeze)


class EpochSeeded(Dataset):
    """A training set whose random augmentations depend on (seed, epoch, image) only.

    With workers that persist across epochs, each worker's random stream would run on from
    epoch to epoch, so a run resumed at epoch k would see other crops than an uninterrupted
    one. Seeding each image from (seed, epoch, index) makes the crops the same whatever the
    number of workers and wherever the run restarted. The epoch lives in shared memory, so
    workers forked once see each new epoch; in the main process (no workers) the global
    random states are put back after each image, so training's own randomness is untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import random

        from torch.utils.data import get_worker_info

        seed = (self.seed * 1_000_003 + int(self.epoch[0]) * 7_919 + index * 104_729) % 2**32
        in_worker = get_worker_info() is not None
        if not in_worker:
            states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed)
        # Augmentations draw from the CPU generator only. torch.manual_seed would also queue a
        # lazy seeding of every accelerator backend, with a captured stack trace each time: a
        # fifth of a loader worker's time per image.
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if not in_worker:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])


def loader_samples_per_s(dataset: Dataset, cfg: TrainConfig, workers: int, max_batches: int = 30,
                         max_seconds: float = 3.0) -> float:
    """The loader alone (decoding and augmentation, no model): training images per second
    over up to `max_batches` batches or `max_seconds`, from the first batch on (worker
    start-up left out) when there are two or more. Next to perf/samples_per_s it says
    whether the loader or the model is the bottleneck. Random states are left as they were."""
    import time

    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, shuffle=False, **{**loader_kwargs(cfg, workers), "persistent_workers": False})
    with torch.random.fork_rng(devices=[]):
        began = time.perf_counter()
        started, counted, first_batch = began, 0, 0
        for images, _ in loader:
            if not first_batch:
                first_batch, started = len(images), time.perf_counter()
                continue
            counted += len(images)
            if counted >= max_batches * cfg.batch_size or time.perf_counter() - started >= max_seconds:
                break
        if not counted:  # a single batch: its time is all there is
            counted, started = first_batch, began
        return counted / max(time.perf_counter() - started, 1e-9)
