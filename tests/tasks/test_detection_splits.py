"""A detector's official split: a manifest's fold (--splits FILE --fold N) over one YOLO or COCO
folder trains, validates and tests on exactly the images it lists; what does not fit is one line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.tasks.detection.data import detection_bundle, detection_splits
from tests.detection_data import digit_scenes, write_coco, write_yolo

SPLITS = {1: ["train"] * 6 + ["val"] * 3 + ["test"] * 3, 2: ["val"] * 3 + ["train"] * 6 + [""] * 3}


def manifest(path: Path, names: list[str], class_column: bool = False) -> Path:
    """A CSV with path (relative to --data), an optional class column, and folds 1 and 2."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", *(["class"] if class_column else []), "1", "2"])
        for index, name in enumerate(names):
            writer.writerow([name, *([""] if class_column else []), SPLITS[1][index], SPLITS[2][index]])
    return path


@pytest.fixture(scope="module")
def scenes():
    return digit_scenes(12, size=48)


@pytest.mark.parametrize("layout", ["yolo", "coco"])
def test_each_fold_holds_exactly_the_listed_images(layout, scenes, tmp_path):
    root = (write_yolo if layout == "yolo" else write_coco)(tmp_path / layout, scenes)
    names = [f"images/scene{index:03d}.png" for index in range(12)]
    listed = manifest(tmp_path / "splits.csv", names, class_column=layout == "coco")
    for fold in (1, 2):
        cfg = TrainConfig(task="detection", data=str(root), splits=str(listed), fold=fold, img_size=48)
        splits = dict(zip(("train", "val", "test"), detection_splits(cfg)))
        for context in ("train", "val", "test"):
            expected = [name for name, split in zip(names, SPLITS[fold]) if split == context]
            found = [f"images/{item.path.name}" for item in splits[context].images] if splits[context] else []
            assert found == expected, (fold, context)
        bundle = detection_bundle(cfg)
        assert len(bundle.train_set) == 6 and len(bundle.val_set) == 3
        assert (bundle.test_set is None) == (fold == 2)
        boxes = {item.path.name: item.boxes for item in splits["train"].images}
        assert all(boxes[name] for name in boxes)  # the annotations came with them


@pytest.mark.parametrize("change, said", [
    ({"fold": 3}, "has its own split into folds 1-2; choose one with --fold N, got --fold 3"),
    ({"test_split": 0.2}, "--test-split would replace its validation or test images"),
    ({"listed": "images/nowhere.png"}, "1 listed image(s) are not under"),
])
def test_what_does_not_fit_the_manifest_is_one_line(change, said, scenes, tmp_path):
    root = write_yolo(tmp_path / "yolo", scenes)
    names = [f"images/scene{index:03d}.png" for index in range(12)]
    names[0] = change.pop("listed", names[0])
    listed = manifest(tmp_path / "splits.csv", names)
    cfg = TrainConfig(task="detection", data=str(root), splits=str(listed), img_size=48, **{"fold": 1, **change})
    with pytest.raises(MlexpError, match=said.replace("(", r"\(").replace(")", r"\)")):
        detection_splits(cfg)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_pictures_of_any_mode_train_a_three_channel_detector(mode, scenes, tmp_path):
    """Greyscale, RGBA or palette PNGs are made RGB as they are read: the channel check before
    the run lets them through, and a detector gets three channels from each."""
    from PIL import Image

    from mlexp.tasks.detection.images import DetectionImages

    root = write_yolo(tmp_path / "yolo", scenes)
    for path in (root / "images").iterdir():
        Image.open(path).convert(mode).save(path)
    cfg = TrainConfig(task="detection", data=str(root), img_size=48)
    train, _, _ = detection_splits(cfg)
    pixels, _ = DetectionImages(train.images, 48)[0]
    assert pixels.shape == (3, 48, 48)
