"""What exactly the train, validation and test splits of a run hold: their digests.

Each split is described by its name, where it comes from, a digest of exactly which images
it holds with which labels (the file list for an image folder, the pixels for the built-in
sets), and its size. MLflow shows them in the run's Datasets column, and the metrics a logged
model is linked to name the split they were measured on. Two runs whose splits have one digest
trained or were evaluated on the same images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from mlexp.data.images import ArrayImages, DataBundle


@dataclass(frozen=True)
class SplitDataset:
    context: str  # train, val or test: MLflow's mlflow.data.context tag
    name: str
    digest: str
    source: str  # where the images are: a folder, or the built-in set's name
    num_images: int
    num_classes: int

    def to_dict(self) -> dict:
        return asdict(self)


def describe_splits(data: DataBundle, source: str) -> list[SplitDataset]:
    splits = [("train", data.train_set), ("val", data.val_set)]
    if data.test_set is not None:
        splits.append(("test", data.test_set))
    return [describe(dataset, context, data.name, source, data.num_classes) for context, dataset in splits]


def split_digest(splits: list[SplitDataset]) -> str:
    """One digest of a run's whole split: which images train, validate and test. Two runs with
    one split digest trained and were evaluated on exactly the same images (tag
    `mlexp.split_digest`: compare never counts such runs as different folds)."""
    joined = "".join(sorted(f"{split.context}\t{split.digest}\n" for split in splits))
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def describe(dataset: Dataset, context: str, data_name: str, source: str, num_classes: int) -> SplitDataset:
    digest, root = content_digest(dataset)
    return SplitDataset(context, f"{data_name}-{context}", digest, root or source, len(dataset), num_classes)


def content_digest(dataset: Dataset) -> tuple[str, str | None]:
    """A short digest of which images (and labels) a split holds, and its folder if it has one."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, np.asarray(dataset.indices)
    digest = hashlib.sha256()
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):  # files: a folder, split files, torchvision's
        samples = dataset.samples if indices is None else [dataset.samples[i] for i in indices]
        for path, label in samples:  # relative paths: the same folder copied elsewhere has the same digest
            digest.update(f"{os.path.relpath(path, dataset.root)}\t{label}\n".encode())
        return digest.hexdigest()[:12], str(dataset.root)
    if isinstance(dataset, ArrayImages):
        chosen = slice(None) if indices is None else indices
        digest.update(np.ascontiguousarray(dataset.images[chosen]).tobytes())
        digest.update(np.ascontiguousarray(dataset.labels[chosen]).tobytes())
        return digest.hexdigest()[:12], None
    if hasattr(dataset, "labels") and hasattr(dataset, "indices"):  # a torchvision dataset held in arrays (CIFAR)
        digest.update(type(dataset.base).__name__.encode())
        chosen = dataset.indices if indices is None else dataset.indices[indices]
        digest.update(np.ascontiguousarray(chosen, dtype=np.int64).tobytes())
        digest.update(np.asarray([dataset.labels[i] for i in chosen], dtype=np.int64).tobytes())
        return digest.hexdigest()[:12], str(getattr(dataset.base, "root", "")) or None
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()[:12], None


DUPLICATE_PAIRS = (("val", "train"), ("test", "train"), ("test", "val"))


def cross_split_duplicates(data: DataBundle) -> tuple[dict[str, int], list[str]]:
    """Images of one split that are byte-for-byte copies of an image of another (val or test
    in train, test in val): ({"data/duplicates_val_in_train": n, ...}, an example of each). A
    copy under another name makes validation or test accuracy overstate. Files are hashed only
    where their size occurs in another split too: distinct images cost one stat each."""
    splits = {"train": data.train_set, "val": data.val_set, "test": data.test_set}
    items = {name: _sized_items(dataset) for name, dataset in splits.items() if dataset is not None}
    sizes = {name: {size for size, _, _ in found} for name, found in items.items()}
    digests: dict[str, dict[str, str]] = {}
    for name, found in items.items():
        shared = set().union(*(sizes[other] for other in items if other != name))
        digests[name] = {hashlib.sha256(read()).hexdigest(): label for size, label, read in found if size in shared}
    counts, examples = {}, []
    for copy, original in DUPLICATE_PAIRS:
        if copy in digests and original in digests:
            common = sorted(digests[copy].keys() & digests[original].keys())
            counts[f"data/duplicates_{copy}_in_{original}"] = len(common)
            examples += [f"{digests[copy][key]} in {copy} = {digests[original][key]} in {original}"
                         for key in common[:1]]
    return counts, examples


def _sized_items(dataset: Dataset) -> list[tuple[int, str, Callable[[], bytes]]]:
    """(size in bytes, name, a reader of its bytes) of each image of a split that has files or
    arrays; [] for others (a torchvision dataset held in its own format)."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):
        samples = dataset.samples if indices is None else [dataset.samples[i] for i in indices]
        return [(os.stat(path).st_size, os.path.relpath(path, dataset.root), Path(path).read_bytes)
                for path, _ in samples]
    if isinstance(dataset, ArrayImages):
        chosen = range(len(dataset.labels)) if indices is None else indices
        return [(dataset.images[i].nbytes, f"image {i}", dataset.images[i].tobytes) for i in chosen]
    return []
