"""Datasets by name: `--data torchvision:NAME:ROOT` reads one of torchvision's classification
datasets from a local folder, with its own official splits (DTD's ten partitions are its folds).

Nothing is downloaded unless the user passes `--download`: a dataset whose files are not under
ROOT is one line naming the layout torchvision expects there. Where a dataset has no
validation split of its own (CIFAR, MNIST, Food-101, ...), validation is a stratified
`--val-split` (or `--folds`) of its training split, with the fixed split seed, as for image
folders; its test split is the run's test set.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from mlexp.data.images import load_rgb_image, to_rgb8
from mlexp.errors import MlexpError

PREFIX = "torchvision:"


@dataclass(frozen=True)
class Reader:
    """How to open one torchvision dataset's splits, and what its files look like under ROOT."""

    splits: dict[str, dict]  # train / val / test -> the constructor's keyword arguments
    layout: str
    partitions: tuple[int, ...] = ()  # official partitions, chosen with --fold (DTD: 1..10)
    extra: dict = field(default_factory=dict)  # other constructor arguments


def _named(train: str = "train", val: str | None = None, test: str | None = "test") -> dict[str, dict]:
    splits = {"train": {"split": train}}
    if val:
        splits["val"] = {"split": val}
    if test:
        splits["test"] = {"split": test}
    return splits


TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
READERS = {
    "DTD": Reader(_named(val="val"), "ROOT/dtd/dtd/images/CLASS/IMAGE.jpg and ROOT/dtd/dtd/labels/"
                  "{train,val,test}N.txt", partitions=tuple(range(1, 11))),
    "Flowers102": Reader(_named(val="val"), "ROOT/flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat"),
    "CIFAR10": Reader(TRAIN_TEST, "ROOT/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"),
    "CIFAR100": Reader(TRAIN_TEST, "ROOT/cifar-100-python/ (train, test, meta)"),
    "MNIST": Reader(TRAIN_TEST, "ROOT/MNIST/raw/ (train-images-idx3-ubyte, ...)"),
    "FashionMNIST": Reader(TRAIN_TEST, "ROOT/FashionMNIST/raw/ (train-images-idx3-ubyte, ...)"),
    "SVHN": Reader(_named(), "ROOT/train_32x32.mat and ROOT/test_32x32.mat"),
    "Food101": Reader(_named(), "ROOT/food-101/images/CLASS/*.jpg and ROOT/food-101/meta/{train,test}.json"),
    "OxfordIIITPet": Reader(_named(train="trainval"), "ROOT/oxford-iiit-pet/images/ and annotations/"),
    "FGVCAircraft": Reader(_named(val="val"), "ROOT/fgvc-aircraft-2013b/data/"),
    "StanfordCars": Reader(_named(), "ROOT/stanford_cars/ (cars_train, cars_test, devkit)"),
    "GTSRB": Reader(_named(), "ROOT/gtsrb/GTSRB/Training/ and Final_Test/"),
    "Country211": Reader(_named(val="valid"), "ROOT/country211/{train,valid,test}/CLASS/*.jpg"),
}


def is_torchvision(data: str) -> bool:
    return data.startswith(PREFIX)


def parse(data: str) -> tuple[str, Reader, Path]:
    """'torchvision:DTD:/data/dtd' -> ('DTD', its reader, Path('/data/dtd'))."""
    name, _, root = data[len(PREFIX):].partition(":")
    if name not in READERS:
        raise MlexpError(f"--data {data}: mlexp reads these torchvision datasets: {', '.join(READERS)} "
                         f"(as torchvision:NAME:ROOT), got {name or 'no name'!r}")
    if not root:
        raise MlexpError(f"--data {data}: name the local folder too, torchvision:{name}:ROOT "
                         f"(ROOT holds {READERS[name].layout})")
    return name, READERS[name], Path(root).expanduser()


class TorchvisionImages(Dataset):
    """One split of a torchvision dataset (some of its images: `indices`), as 8-bit RGB images
    with labels numbered by the training split's classes."""

    def __init__(self, base: Dataset, labels: list[int], indices: np.ndarray | None = None, transform=None):
        self.base, self.labels, self.transform = base, labels, transform
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        files = getattr(base, "_image_files", None)  # DTD, Flowers102, Food101, ...: its files, for digests
        if files is not None:
            self.root = str(getattr(base, "_images_folder", Path(files[0]).parent if files else base.root))
            self.samples = [(str(files[i]), labels[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, _ = self.base[int(self.indices[index])]
        image = to_rgb8(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[int(self.indices[index])]

    def subset(self, indices: np.ndarray, transform) -> "TorchvisionImages":
        return TorchvisionImages(self.base, self.labels, self.indices[indices], transform)


def open_split(data: str, context: str, fold: int, download: bool) -> tuple[Dataset, list[str]] | None:
    """The torchvision dataset of one split (None if the dataset has no such split) and its class names."""
    name, reader, root = parse(data)
    if context not in reader.splits:
        return None
    kwargs = {**reader.splits[context], **reader.extra, "download": download}
    constructor = getattr(datasets, name)
    if reader.partitions:
        kwargs["partition"] = fold
    if "loader" in inspect.signature(constructor).parameters:
        kwargs["loader"] = load_rgb_image
    try:
        base = constructor(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        raise MlexpError(f"--data {data}: torchvision's {name} cannot be read from {root} "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); expected "
                         f"{reader.layout}" + ("" if download else "; --download fetches it")) from None
    return base, list(getattr(base, "classes", []) or [])


def labels_of(base: Dataset) -> list[int]:
    """Every image's label, from the attribute the dataset keeps them in (reading every image
    would decode the whole dataset)."""
    for attribute in ("targets", "_labels", "labels"):
        values = getattr(base, attribute, None)
        if values is not None:
            return [int(value) for value in np.asarray(values).tolist()]
    samples = getattr(base, "_samples", None)
    if samples is not None:
        return [int(label) for _, label in samples]
    return [int(base[index][1]) for index in range(len(base))]


def renumbered(labels: list[int], names: list[str], train_names: list[str], where: str) -> list[int]:
    """Labels of a split numbered by the training split's class names (DTD numbers each split's
    classes on their own)."""
    if not names or names == train_names:
        return labels
    index = {name: number for number, name in enumerate(train_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise MlexpError(f"{where} has classes the training split lacks: {', '.join(unknown[:5])}")
    return [index[names[label]] for label in labels]


def partitions(data: str) -> tuple[int, ...]:
    return parse(data)[1].partitions
