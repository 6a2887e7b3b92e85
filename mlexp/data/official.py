"""Data with splits of its own: a folder of split files, a split manifest, a torchvision dataset.

Such data is split as its authors published it, so `--fold N` names one of its folds (DTD's
partition N) rather than a stratified k-fold of a pool, and a `--folds` count, `--val-dir`
or a `--test-split` would quietly replace the official split: each is a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlexp.config import TrainConfig
from mlexp.data import partitions, torchvision_sets
from mlexp.data.images import DataBundle, ListedImages
from mlexp.data.splits import check_split, split_indices
from mlexp.data.transforms import build_transforms
from mlexp.errors import MlexpError
from mlexp.option_values import BUILT_IN


def official_folds(cfg: TrainConfig) -> list[int]:
    """The fold numbers of the data's own split ([] when it has none: then folds are a
    stratified k-fold of one pool, and validation a --val-split or a folder)."""
    if cfg.splits:
        return partitions.manifest_numbers(Path(cfg.splits).expanduser(), need_class=cfg.task == "classification")
    if torchvision_sets.is_torchvision(cfg.data):
        return list(torchvision_sets.partitions(cfg.data))
    if cfg.data in BUILT_IN:
        return []
    labels = partitions.split_file_folder(Path(cfg.data).expanduser())
    return partitions.split_file_numbers(labels) if labels else []


def describe_folds(cfg: TrainConfig, folds: list[int]) -> str:
    where = f"--splits {cfg.splits}" if cfg.splits else f"--data {cfg.data}"
    shown = f"{folds[0]}-{folds[-1]}" if folds == list(range(folds[0], folds[-1] + 1)) else ",".join(map(str, folds))
    return f"{where} has its own split into folds {shown}"


def check_official_split(cfg: TrainConfig, folds: list[int]) -> None:
    """The options that would replace an official split, and a fold it does not have."""
    said = describe_folds(cfg, folds)
    if cfg.folds:
        raise MlexpError(f"{said}; --folds {cfg.folds} would make stratified folds of a pool instead: drop it and "
                         f"choose a fold with --fold N (a sweep trains several: --folds {folds[0]}-{folds[-1]})")
    if cfg.fold not in folds:
        raise MlexpError(f"{said}; choose one with --fold N, got --fold {cfg.fold} "
                         f"(`mlexp sweep --folds {folds[0]}-{folds[-1]}` trains each)")
    for value, option in ((cfg.val_dir, "--val-dir"), (cfg.test_dir, "--test-dir"), (cfg.test_split, "--test-split")):
        if value:
            raise MlexpError(f"{said}; {option} would replace its validation or test images: drop {option}")


def official_bundle(cfg: TrainConfig) -> DataBundle | None:
    """The run's data when it comes with its own split; None for a plain folder or built-in set."""
    if torchvision_sets.is_torchvision(cfg.data):
        return torchvision_bundle(cfg)
    partition = read_partition(cfg)
    if partition is None:
        return None
    classes = partition.classes
    sets = {context: ListedImages(partition.images_root, rows, classes, build_transforms(cfg, train=context == "train"),
                                   cfg.in_chans)
            for context, rows in partition.members.items()}
    return DataBundle(sets["train"], sets["val"], len(classes), classes, Path(cfg.data).expanduser().name,
                      sets.get("test"))


def read_partition(cfg: TrainConfig) -> partitions.Partition | None:
    """The --fold of a split manifest or of DATA/labels/ split files; None when there are none."""
    data = Path(cfg.data).expanduser()
    if cfg.splits:
        return partitions.read_manifest(Path(cfg.splits).expanduser(), data, cfg.fold)
    if cfg.data not in BUILT_IN and partitions.split_file_folder(data):
        return partitions.read_split_files(data, cfg.fold)
    return None


def check_official(cfg: TrainConfig) -> bool:
    """For data with its own split: the fold exists, nothing replaces the split, the listed
    images are there and train on at least 2 classes. False for other data (checked elsewhere)."""
    if cfg.splits and cfg.data in BUILT_IN:
        raise MlexpError(f"--splits lists image files; pass the folder they are under as --data, not {cfg.data!r}")
    if torchvision_sets.is_torchvision(cfg.data):
        return check_torchvision(cfg)
    folds = official_folds(cfg)
    if not folds:
        return False
    check_official_split(cfg, folds)
    partition = read_partition(cfg)
    trained = {name for _, name in partition.members["train"]}
    if len(trained) < 2:
        raise MlexpError(f"{partition.source}: fold {cfg.fold} trains on {len(trained)} class(es); classification "
                         "needs at least 2")
    return True


def check_torchvision(cfg: TrainConfig) -> bool:
    folds = official_folds(cfg)
    if folds:
        check_official_split(cfg, folds)
    base, names = torchvision_sets.open_split(cfg.data, "train", cfg.fold, cfg.download)
    labels = torchvision_sets.labels_of(base)
    counts = {names[label] if names else str(label): count for label, count in
              enumerate(np.bincount(labels)) if count}
    if len(counts) < 2:
        raise MlexpError(f"--data {cfg.data}: its training split has {len(counts)} class(es); classification needs "
                         "at least 2")
    if torchvision_sets.open_split(cfg.data, "val", cfg.fold, cfg.download) is None:
        check_split(counts, cfg, f"--data {cfg.data}")  # validation comes out of its training split
    return True


def torchvision_bundle(cfg: TrainConfig) -> DataBundle:
    """Train, validation and test sets of a torchvision dataset: its own splits where it has
    them; validation otherwise a --val-split (or k-fold) of its training split."""
    name = torchvision_sets.parse(cfg.data)[0]
    base, names = torchvision_sets.open_split(cfg.data, "train", cfg.fold, cfg.download)
    labels = torchvision_sets.labels_of(base)
    names = names or [str(label) for label in range(max(labels) + 1)]
    train = torchvision_sets.TorchvisionImages(base, labels, None, build_transforms(cfg, train=True))
    others = {}
    for context in ("val", "test"):
        opened = torchvision_sets.open_split(cfg.data, context, cfg.fold, cfg.download)
        if opened is not None:
            split_labels = torchvision_sets.renumbered(torchvision_sets.labels_of(opened[0]), opened[1], names,
                                                       f"{cfg.data} ({context})")
            others[context] = torchvision_sets.TorchvisionImages(opened[0], split_labels, None,
                                                                 build_transforms(cfg, train=False))
    if "val" not in others:
        train_idx, val_idx, _ = split_indices(np.asarray(labels), cfg)
        others["val"] = train.subset(val_idx, build_transforms(cfg, train=False))
        train = train.subset(train_idx, build_transforms(cfg, train=True))
    return DataBundle(train, others["val"], len(names), names, name, others.get("test"))
