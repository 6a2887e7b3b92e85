"""A real detection set, built offline: scikit-learn's handwritten digits placed at known boxes
on crops of scikit-image's photographs, written in both layouts mlexp reads (YOLO folders and
COCO JSON), with the same boxes in each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as photos
from sklearn.datasets import load_digits

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
CLASSES = ("zero", "one", "two")  # digits 0, 1 and 2: few enough to learn in a few CPU epochs


def digit_scenes(count: int, size: int = 96, seed: int = 0) -> list[tuple[np.ndarray, list[tuple[int, list[int]]]]]:
    """`count` RGB images of `size` px, each with 1-2 digits: (pixels, [(class, [x, y, w, h])...])."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    wanted = [np.flatnonzero(digits.target == label) for label in range(len(CLASSES))]
    backgrounds = [getattr(photos, name)() for name in PHOTOS]
    scenes = []
    for _ in range(count):
        photo = backgrounds[rng.integers(len(backgrounds))]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        canvas = (photo[top:top + size, left:left + size, :3] * 0.5).astype(np.uint8)  # darker: the digits stand out
        boxes = []
        for _ in range(rng.integers(1, 3)):
            label = int(rng.integers(len(CLASSES)))
            side = int(rng.integers(size // 4, size // 3))
            glyph = digits.images[rng.choice(wanted[label])] / 16.0
            glyph = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.NEAREST))
            x, y = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            region = canvas[y:y + side, x:x + side]
            region[:] = np.maximum(region, glyph[..., None])
            boxes.append((label, [x, y, side, side]))
        scenes.append((canvas, boxes))
    return scenes


def write_yolo(root: Path, scenes, classes_file: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for index, (pixels, boxes) in enumerate(scenes):
        Image.fromarray(pixels).save(root / "images" / f"scene{index:03d}.png")
        size = pixels.shape[0]
        lines = [f"{label} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}"
                 for label, (x, y, w, h) in boxes]
        (root / "labels" / f"scene{index:03d}.txt").write_text("\n".join(lines) + "\n")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def write_coco(root: Path, scenes) -> Path:
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, (pixels, boxes) in enumerate(scenes):
        Image.fromarray(pixels).save(root / "images" / f"scene{index:03d}.png")
        images.append({"id": index + 1, "file_name": f"scene{index:03d}.png", "width": pixels.shape[1],
                       "height": pixels.shape[0]})
        annotations += [{"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0} for label, box in boxes]
    categories = [{"id": n + 1, "name": name} for n, name in enumerate(CLASSES)]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}, indent=1))
    return root
