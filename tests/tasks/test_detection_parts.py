"""Detection's parts on real images (digits placed on photographs): both layouts read the same
boxes, every malformed annotation is named with its file and line, the detector's loss has its
four components summing to the total, and COCO's mAP scores what it should."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mlexp.errors import MlexpError
from mlexp.models.build import create_model
from mlexp.models.catalogue import resolve_backbone
from mlexp.tasks.detection.annotations import read_split
from mlexp.tasks.detection.images import DetectionImages, collate
from mlexp.tasks.detection.metrics import as_metric_inputs, map_results, new_map_metric
from mlexp.tasks.detection.model import build_detector
from tests.detection_data import CLASSES, digit_scenes, write_coco, write_yolo


@pytest.fixture(scope="module")
def scenes():
    return digit_scenes(6, size=64)


def test_yolo_and_coco_layouts_give_the_same_images_boxes_and_classes(scenes, tmp_path):
    yolo, coco = read_split(write_yolo(tmp_path / "yolo", scenes)), read_split(write_coco(tmp_path / "coco", scenes))
    assert yolo.class_names == coco.class_names == list(CLASSES)
    assert [image.path.name for image in yolo.images] == [image.path.name for image in coco.images]
    for from_yolo, from_coco, (_, boxes) in zip(yolo.images, coco.images, scenes):
        assert from_yolo.labels == from_coco.labels == [label for label, _ in boxes]
        assert torch.allclose(torch.tensor(from_yolo.boxes), torch.tensor(from_coco.boxes), atol=1e-5)
        x, y, w, h = boxes[0][1]
        assert torch.allclose(torch.tensor(from_coco.boxes[0]), torch.tensor([x, y, x + w, y + h]) / 64)


def test_an_empty_label_file_and_an_image_without_one_are_negatives(scenes, tmp_path):
    root = write_yolo(tmp_path / "yolo", scenes[:3])
    (root / "labels" / "scene000.txt").write_text("")
    (root / "labels" / "scene001.txt").unlink()
    split = read_split(root)
    assert [len(image.boxes) for image in split.images[:2]] == [0, 0] and split.images[2].boxes
    pixels, target = DetectionImages(split.images, 32)[0]
    assert pixels.shape == (3, 32, 32) and target["boxes"].shape == (0, 4) and target["labels"].numel() == 0


@pytest.mark.parametrize("line, problem", [
    ("0 0.95 0.5 0.2 0.2", "a box outside its image"),
    ("1 0.5 0.5 0 0.2", "a box with non-positive size"),
    ("7 0.5 0.5 0.2 0.2", "unknown class id 7; the class ids are 0..2"),
    ("1 0.5 0.5", "expected `class cx cy w h`"),
])
def test_a_malformed_yolo_line_is_named_with_its_file_and_line(line, problem, scenes, tmp_path):
    root = write_yolo(tmp_path / "yolo", scenes[:2])
    label_file = root / "labels" / "scene001.txt"
    label_file.write_text(label_file.read_text() + line + "\n")
    lines = label_file.read_text().splitlines()
    with pytest.raises(MlexpError) as raised:
        read_split(root)
    assert f"{label_file} line {len(lines)}: {problem}" in str(raised.value)


def test_a_label_file_without_its_image_is_named(scenes, tmp_path):
    root = write_yolo(tmp_path / "yolo", scenes[:2])
    (root / "images" / "scene001.png").unlink()
    with pytest.raises(MlexpError, match=r"scene001.txt: a label file without its image"):
        read_split(root)


@pytest.mark.parametrize("change, problem", [
    (lambda note: note.update(bbox=[50, 10, 30, 10]), "a box outside its image"),
    (lambda note: note.update(bbox=[5, 5, -3, 10]), "a box with non-positive size"),
    (lambda note: note.update(category_id=9), "unknown class id 9"),
])
def test_a_malformed_coco_annotation_is_named_with_its_file_and_line(change, problem, scenes, tmp_path):
    root = write_coco(tmp_path / "coco", scenes[:3])
    path = root / "annotations.json"
    coco = json.loads(path.read_text())
    change(coco["annotations"][2])
    path.write_text(json.dumps(coco, indent=1))
    lines = path.read_text().splitlines()
    start = next(n for n, text in enumerate(lines, 1) if '"annotations"' in text)
    line = [n for n, text in enumerate(lines, 1) if n > start and text.strip() == "{"][2]  # the third one's "{"
    with pytest.raises(MlexpError) as raised:
        read_split(root)
    assert f"{path} line {line}: {problem}" in str(raised.value)


def test_the_detector_s_loss_has_four_components_that_sum_to_the_total(scenes, tmp_path):
    torch.manual_seed(0)
    split = read_split(write_yolo(tmp_path / "yolo", scenes))
    spec = resolve_backbone("test_resnet", "scratch", None)
    detector = build_detector(spec, create_model(spec, len(CLASSES), 64), len(CLASSES), 64)
    images, targets = collate([DetectionImages(split.images, 64)[n] for n in range(4)])
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    total.backward()
    assert all(parameter.grad is not None for parameter in detector.backbone.body.parameters())
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 4 and {"boxes", "scores", "labels"} <= set(detections[0])


def test_coco_map_is_one_for_the_truth_and_zero_for_boxes_elsewhere(scenes, tmp_path):
    split = read_split(write_coco(tmp_path / "coco", scenes))
    targets = [DetectionImages(split.images, 64)[n][1] for n in range(len(split.images))]
    perfect, elsewhere = new_map_metric(), new_map_metric()
    truth_as_found = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    perfect.update(*as_metric_inputs(truth_as_found, targets))
    shifted = [{**t, "boxes": t["boxes"] + 200} for t in truth_as_found]
    elsewhere.update(*as_metric_inputs(shifted, targets))
    scores, rows = map_results(perfect, list(CLASSES))
    assert scores == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    assert [row["class"] for row in rows] == list(CLASSES) and all(row["ap"] == 1.0 for row in rows)
    assert map_results(elsewhere, list(CLASSES))[0]["map_50"] == 0.0


def test_strategies_treat_the_detector_s_heads_as_its_classifier_and_its_stages_as_layers(scenes, tmp_path):
    """linear: the pyramid, RPN and box head train, the backbone never; gradual: heads, then the
    top stage, then everything; full: the backbone's stages get decayed learning rates, bottom
    lowest, the heads the full one. A step of each moves exactly what it should."""
    from mlexp.config import TrainConfig
    from mlexp.models.strategies import build_strategy

    split = read_split(write_yolo(tmp_path / "yolo", scenes))
    images, targets = collate([DetectionImages(split.images, 64)[n] for n in range(4)])
    spec = resolve_backbone("test_resnet", "scratch", None)
    heads = ("backbone.fpn.", "rpn.", "roi_heads.")
    for name in ("linear", "gradual", "full"):
        torch.manual_seed(0)
        detector = build_detector(spec, create_model(spec, len(CLASSES), 64), len(CLASSES), 64)
        cfg = TrainConfig(task="detection", strategy=name, backbone="test_resnet", init="scratch")
        strategy = build_strategy(detector, spec.family, cfg)
        groups = strategy.param_groups(0.0)
        before = {key: value.detach().clone() for key, value in detector.state_dict().items()}
        optimizer = torch.optim.SGD([{**group, "lr": 0.1 * group["lr_scale"]} for group in groups])
        strategy.train_mode(detector)
        sum(detector(images, targets).values()).backward()
        strategy.drop_frozen_grads()
        optimizer.step()
        moved = {key for key, value in detector.state_dict().items()
                 if value.is_floating_point() and not torch.equal(value, before[key])}
        body_moved = {key for key in moved if key.startswith("backbone.body.")}
        assert any(key.startswith(heads) for key in moved), name
        if name == "full":
            stages = sorted({group["layer_id"] for group in groups})
            scales = {group["layer_id"]: group["lr_scale"] for group in groups}
            assert len(stages) > 3 and scales[stages[-1]] == 1.0  # the heads: the full rate
            assert all(scales[a] < scales[b] for a, b in zip(stages, stages[1:]))  # bottom lowest
            assert body_moved
        else:
            assert not body_moved, (name, sorted(body_moved)[:3])  # phase 0: the backbone stays
        if name == "gradual":  # its second phase opens the backbone's top stage, and only it
            top = [child for child, _ in detector.backbone.body.named_children()][-1]
            assert strategy.num_phases == 3 and re.match(strategy.patterns[1], f"backbone.body.{top}.0.conv1.weight")
            assert not re.match(strategy.patterns[1], "backbone.body.conv1.weight")
