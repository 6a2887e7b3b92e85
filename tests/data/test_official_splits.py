"""Data with a split of its own: DTD-layout split files, a split manifest, torchvision's DTD
read from a local root, and the fold selections a sweep makes of them. Real images
(scikit-learn's digits), real torchvision readers, nothing downloaded."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlexp.config import TrainConfig
from mlexp.data.digests import describe_splits, split_digest
from mlexp.data.images import digits_arrays
from mlexp.data.partitions import parse_folds
from mlexp.data.sources import build_data, check_data_source
from mlexp.errors import MlexpError
from mlexp.sweep.plan import sweep_folds

CLASSES = ["zero", "one", "two", "three"]
CONTEXTS = ("train", "val", "test")


def make_dtd_layout(data: Path, partitions: int = 3, per_class: int = 12) -> Path:
    """DTD's own layout: DATA/images/CLASS/FILE and DATA/labels/{train,val,test}N.txt, one path
    per line relative to images/, each partition a different shuffle; images: real digits."""
    images, labels = digits_arrays()
    rng = np.random.default_rng(0)
    files: dict[str, list[str]] = {}
    for number, name in enumerate(CLASSES):
        (data / "images" / name).mkdir(parents=True, exist_ok=True)
        files[name] = []
        for index, row in enumerate(np.flatnonzero(labels == number)[:per_class]):
            Image.fromarray(images[row]).resize((16, 16)).save(data / "images" / name / f"{name}_{index:04d}.png")
            files[name].append(f"{name}/{name}_{index:04d}.png")
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for partition in range(1, partitions + 1):
        split = {context: [] for context in CONTEXTS}
        for name in CLASSES:
            order = list(rng.permutation(files[name]))
            split["train"] += order[:6]
            split["val"] += order[6:9]
            split["test"] += order[9:]
        for context, lines in split.items():
            (data / "labels" / f"{context}{partition}.txt").write_text("\n".join(lines) + "\n")
    return data


def lines(data: Path, context: str, partition: int) -> list[str]:
    return (data / "labels" / f"{context}{partition}.txt").read_text().split()


def members(dataset) -> list[str]:
    return [str(Path(path).relative_to(dataset.root)) for path, _ in dataset.samples]


def expected_digest(file_lines: list[str]) -> str:
    """The split digest the files describe: each line with its class's number, in file order."""
    digest = hashlib.sha256()
    for line in file_lines:
        digest.update(f"{line}\t{sorted(CLASSES).index(line.split('/')[0])}\n".encode())
    return digest.hexdigest()[:12]


@pytest.fixture
def dtd(tmp_path) -> Path:
    return make_dtd_layout(tmp_path / "dtd")


def test_split_files_train_validate_and_test_on_their_lines_exactly(dtd):
    digests = set()
    for partition in (1, 2, 3):
        cfg = TrainConfig(data=str(dtd), fold=partition, img_size=16)
        check_data_source(cfg)
        data = build_data(cfg)
        for context, dataset in zip(CONTEXTS, (data.train_set, data.val_set, data.test_set)):
            assert members(dataset) == lines(dtd, context, partition)
        described = describe_splits(data, cfg.data)
        assert [split.digest for split in described] == [expected_digest(lines(dtd, c, partition)) for c in CONTEXTS]
        digests.add(split_digest(described))
        assert data.class_names == sorted(CLASSES)
        image, label = data.train_set[0]
        assert tuple(image.shape) == (3, 16, 16) and label == sorted(CLASSES).index(lines(dtd, "train", partition)[0]
                                                                                   .split("/")[0])
    assert len(digests) == 3  # three partitions, three different splits


def test_a_manifest_in_csv_or_json_gives_the_same_split_as_the_files(dtd, tmp_path):
    rows = {}
    for partition in (1, 2, 3):
        for context in CONTEXTS:
            for line in lines(dtd, context, partition):
                rows.setdefault(line, {})[partition] = context
    with open(tmp_path / "splits.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "class", "fold1", "fold2", "fold3"])
        for path, folds in rows.items():
            writer.writerow([f"images/{path}", path.split("/")[0], *(folds.get(p, "") for p in (1, 2, 3))])
    (tmp_path / "splits.json").write_text(json.dumps(
        [{"path": f"images/{path}", "class": path.split("/")[0], "folds": {str(p): s for p, s in folds.items()}}
         for path, folds in rows.items()]))
    for manifest in ("splits.csv", "splits.json"):
        cfg = TrainConfig(data=str(dtd), splits=str(tmp_path / manifest), fold=2, img_size=16)
        check_data_source(cfg)
        data = build_data(cfg)
        assert sorted(members(data.val_set)) == sorted(f"images/{line}" for line in lines(dtd, "val", 2))
        assert sorted(members(data.train_set)) == sorted(f"images/{line}" for line in lines(dtd, "train", 2))


def test_torchvision_dtd_from_a_local_root_in_its_own_layout(dtd, tmp_path):
    root = tmp_path / "tv"
    (root / "dtd").mkdir(parents=True)
    dtd.rename(root / "dtd" / "dtd")  # torchvision's DTD reads ROOT/dtd/dtd/{images,labels}
    cfg = TrainConfig(data=f"torchvision:DTD:{root}", fold=3, img_size=16)
    check_data_source(cfg)  # no --download: it never tries to fetch anything
    data = build_data(cfg)
    for context, dataset in zip(CONTEXTS, (data.train_set, data.val_set, data.test_set)):
        assert members(dataset) == lines(root / "dtd" / "dtd", context, 3)
    assert data.class_names == sorted(CLASSES) and data.name == "DTD"
    image, label = data.val_set[1]
    assert tuple(image.shape) == (3, 16, 16) and 0 <= label < 4
    with pytest.raises(MlexpError, match="choose one with --fold N, got --fold 11"):
        check_data_source(cfg.replace(fold=11))


def test_a_torchvision_dataset_without_its_files_names_the_layout(tmp_path):
    with pytest.raises(MlexpError, match=r"cifar-10-batches-py.*--download fetches it") as raised:
        check_data_source(TrainConfig(data=f"torchvision:CIFAR10:{tmp_path}"))
    assert "\n" not in str(raised.value)
    with pytest.raises(MlexpError, match="mlexp reads these torchvision datasets: DTD, Flowers102, CIFAR10"):
        check_data_source(TrainConfig(data=f"torchvision:ImageNette:{tmp_path}"))


@pytest.mark.parametrize("change, message", [
    ({"folds": 3}, "--folds 3 would make stratified folds of a pool instead"),
    ({"fold": 0}, "has its own split into folds 1-3; choose one with --fold N, got --fold 0"),
    ({"test_split": 0.2}, "--test-split would replace its validation or test images"),
])
def test_options_that_would_replace_an_official_split_are_refused(dtd, change, message):
    with pytest.raises(MlexpError, match=message):
        check_data_source(TrainConfig(data=str(dtd), fold=1).replace(**change))


def test_damaged_split_files_are_named(dtd):
    with pytest.raises(MlexpError, match=r"--splits .*nothing.csv: no such file"):
        check_data_source(TrainConfig(data=str(dtd), splits=str(dtd / "nothing.csv"), fold=1))
    (dtd / "labels" / "val2.txt").write_text((dtd / "labels" / "val2.txt").read_text() + "zero/missing.png\n")
    with pytest.raises(MlexpError, match=r"1 listed image\(s\) are not under .*zero/missing.png"):
        check_data_source(TrainConfig(data=str(dtd), fold=2))
    twice = lines(dtd, "train", 3)[0]
    (dtd / "labels" / "test3.txt").write_text(twice + "\n")
    with pytest.raises(MlexpError, match=f"{twice} is in both train and test of fold 3"):
        check_data_source(TrainConfig(data=str(dtd), fold=3))


def test_fold_selections_of_a_sweep(dtd):
    assert parse_folds("1-10") == list(range(1, 11)) and parse_folds("1,3,5") == [1, 3, 5]
    assert parse_folds("1-3,2,7") == [1, 2, 3, 7]
    with pytest.raises(MlexpError, match="runs backwards"):
        parse_folds("3-1")
    official = TrainConfig(data=str(dtd))
    assert sweep_folds(official, "2", None)[1] == [2]  # partition 2 alone, not "2 folds"
    assert sweep_folds(official, "1-3", None)[1] == [1, 2, 3] == sweep_folds(official, None, None)[1]
    with pytest.raises(MlexpError, match="it has no fold 4"):
        sweep_folds(official, "2-4", None)
    pooled = TrainConfig(data="digits")
    base, folds = sweep_folds(pooled, "5", "1,3")
    assert (base.folds, folds) == (5, [1, 3])
    assert sweep_folds(pooled, "3", None)[1] == [0, 1, 2] and sweep_folds(pooled, None, None)[1] == [0]
    with pytest.raises(MlexpError, match="--data digits has none"):
        sweep_folds(pooled, "1-3", None)
    with pytest.raises(MlexpError, match="numbers its folds 0-4"):
        sweep_folds(pooled, "5", "5")


def test_exact_copies_across_the_splits_are_counted(dtd):
    from mlexp.data.digests import cross_split_duplicates

    train_line, val_line = lines(dtd, "train", 1)[0], lines(dtd, "val", 1)[0]
    (dtd / "images" / val_line).write_bytes((dtd / "images" / train_line).read_bytes())  # a copy, another name
    counts, examples = cross_split_duplicates(build_data(TrainConfig(data=str(dtd), fold=1, img_size=16)))
    assert counts == {"data/duplicates_val_in_train": 1, "data/duplicates_test_in_train": 0,
                      "data/duplicates_test_in_val": 0}
    assert examples == [f"{val_line} in val = {train_line} in train"]
    clean = cross_split_duplicates(build_data(TrainConfig(data="digits", img_size=16)))[0]
    assert clean == {"data/duplicates_val_in_train": 0}
