"""Images as mlexp reads them: every source yields 8-bit RGB PIL images.

`load_rgb_image` brings any image file (16-bit, float, palette, with alpha, ...) to 8-bit RGB by
its real range; hidden entries (names starting with a dot: `.ipynb_checkpoints`, `.git`,
`.DS_Store`) are never classes or images; datasets of images in memory, in a class-folder tree
or listed by split files.
"""

# Imported where used: `sklearn` (its datasets), which only `--data digits` needs.
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from mlexp.data.splits import SPLIT_SEED
from mlexp.data.stacks import STACK_SUFFIX, is_stack, load_stack
from mlexp.errors import MlexpError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", STACK_SUFFIX)
# What reading a damaged or hostile file raises: PIL's decompression-bomb guard (a 60000 x 60000
# header in a small file) is its own exception, neither an OSError nor a ValueError.
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)
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


def class_files(root: Path, name: str) -> tuple[list[str], list[str]]:
    """One class's images: (paths, links into other classes). Symlinks are followed, each real
    file counted once and each real folder walked once (a directory link that loops back ends
    there instead of multiplying the class), in a stable order. A file that really lies in
    another class folder of this tree would be relabelled: it is left out and returned apart."""
    root_text = str(root)
    others = [os.path.realpath(root / other) + os.sep for other in class_folders(root) if other != name]
    walked, visits = set(), []
    for folder, subfolders, names in os.walk(root / name, followlinks=True):
        real = os.path.realpath(folder)
        subfolders[:] = [] if real in walked else [d for d in subfolders if not is_hidden(d)]
        if real not in walked:
            walked.add(real)
            visits.append((folder, names))
    counted, files, foreign = set(), [], []
    for folder, names in sorted(visits):  # torchvision's order: folders by path, then files by name
        for file_name in sorted(names):
            path = os.path.join(folder, file_name)
            real_file = os.path.realpath(path)
            if real_file in counted or not _is_image_under(root_text, path):
                continue
            counted.add(real_file)
            (foreign if any(real_file.startswith(other) for other in others) else files).append(path)
    return files, foreign


def class_image_counts(root: Path) -> dict[str, int]:
    """Images per class, found by the same rule CheckedImageFolder uses (class_files); links
    into another class are said in one line (left out of both)."""
    counts, foreign = {}, {}
    for name in class_folders(root):
        files, links = class_files(root, name)
        counts[name] = len(files)
        if links:
            foreign[name] = links
    if foreign:
        total = sum(len(links) for links in foreign.values())
        name, links = next(iter(foreign.items()))
        print(f"mlexp: warning: {total} image(s) in {root} are links into another class's folder (e.g. {links[0]} "
              f"under {name!r}): left out, since their label would be two classes", flush=True)
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


def load_image(path: str, in_chans: int = 3):
    """The datasets' loader: an image file as 8-bit RGB (load_rgb_image), a stack file
    (mlexp.data.stacks, --in-chans) as its array."""
    return load_stack(path) if is_stack(path, in_chans) else load_rgb_image(path)


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that skips hidden folders and files, loads every image mode as 8-bit RGB,
    and turns unreadable files into a user error naming the file."""

    def __init__(self, root: str | Path, transform=None, in_chans: int = 3):
        root = os.path.expanduser(str(root))
        # A partial, not a lambda: DataLoader workers may need to pickle the dataset.
        super().__init__(root, transform=transform, loader=partial(load_image, in_chans=in_chans),
                         is_valid_file=partial(_is_image_under, root))

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """Each real image once, per class_files (torchvision's walk would follow a symlink loop
        until the path is too long, and count every lap)."""
        samples = [(path, index) for name, index in sorted(class_to_idx.items(), key=lambda item: item[1])
                   for path in class_files(Path(directory), name)[0]]
        if not samples and not allow_empty:
            raise FileNotFoundError(f"Found no valid image file in {directory}.")
        return samples

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        try:
            return super().__getitem__(index)
        except UNREADABLE as error:
            raise MlexpError(f"cannot read image {path} ({error}); fix or remove the file") from None
        except MlexpError as error:  # a stack of the wrong shape or channel count: which file
            raise MlexpError(str(error) if path in str(error) else f"{path}: {error}") from None


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




class ListedImages(Dataset):
    """Images named by a list (split files, a split manifest): (path relative to `root`, class
    name) pairs, labelled by their class's place in `classes`, in the list's order."""

    def __init__(self, root: str | Path, rows: list[tuple[str, str]], classes: list[str], transform=None,
                 in_chans: int = 3):
        self.root, self.classes, self.transform, self.in_chans = str(root), classes, transform, in_chans
        number = {name: index for index, name in enumerate(classes)}
        self.samples = [(os.path.join(self.root, relative), number[name]) for relative, name in rows]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_image(path, self.in_chans)
            return (self.transform(image) if self.transform is not None else image), label
        except UNREADABLE as error:
            raise MlexpError(f"cannot read image {path} ({error}); fix or remove the file") from None
        except MlexpError as error:  # a stack of the wrong shape or channel count: which file
            raise MlexpError(str(error) if path in str(error) else f"{path}: {error}") from None
