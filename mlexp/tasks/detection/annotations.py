"""Detection data in: YOLO folders (`images/` + `labels/*.txt`) and COCO JSON
(`annotations.json` + images), each read into one list of annotated images.

Everything is checked before a run exists, and a problem is named with its file and line:
a box outside its image or with a non-positive size, an unknown class id, a label file
without its image. An empty label file (or an image without one) is a valid negative: an
image with nothing to detect.

Boxes are kept as (x0, y0, x1, y1) fractions of their image's width and height, the form
both layouts convert to without knowing the size an image is resized to later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlexp.errors import MlexpError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".npy")
COCO_FILE = "annotations.json"
CLASSES_FILE = "classes.txt"  # YOLO: one class name per line, line n is class id n


@dataclass
class AnnotatedImage:
    path: Path
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # (x0, y0, x1, y1), fractions
    labels: list[int] = field(default_factory=list)  # class ids, 0-based
    bands: list[Path] = field(default_factory=list)  # --bands: its file in each band folder, in order


@dataclass
class DetectionSplit:
    images: list[AnnotatedImage]
    class_names: list[str]


def is_detection_folder(root: Path) -> bool:
    """A COCO file, or YOLO's images/ + labels/ pair, here or in train/."""
    return any((base / COCO_FILE).is_file() or ((base / "images").is_dir() and (base / "labels").is_dir())
               for base in (root, root / "train"))


def read_split(root: Path, bands: tuple[str, ...] = ()) -> DetectionSplit:
    """One split's annotated images (COCO when its JSON file is there, YOLO otherwise), each
    with its file in every band folder (`root/BAND/`, --bands)."""
    if (root / COCO_FILE).is_file():
        split = read_coco(root / COCO_FILE)
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        split = read_yolo(root)
    else:
        raise MlexpError(f"detection data folder {root} has neither {COCO_FILE} nor images/ and labels/ folders")
    for band in bands:
        attach_band(split, root, band)
    return split


def attach_band(split: DetectionSplit, root: Path, band: str) -> None:
    """Give each image its file of the same name (any image, .npy or TIFF suffix) in root/BAND/,
    at the path it has under images/ (or under root); one missing is an error naming it."""
    folder = root / band
    if not folder.is_dir():
        raise MlexpError(f"--bands {band}: no folder {folder} (a band folder sits beside images/)")
    found = {(path.parent, path.stem): path for path in folder.rglob("*")
             if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")}
    for item in split.images:
        base = root / "images" if root / "images" in item.path.parents else root
        if not item.path.is_relative_to(base):
            raise MlexpError(f"{item.path}: outside {root}, so it has no place in {folder} (--bands {band})")
        where = folder / item.path.parent.relative_to(base)
        if (where, item.path.stem) not in found:
            raise MlexpError(f"{item.path}: no {band} file of the same name ({where / item.path.stem}.*): with "
                             f"--bands each image needs one in every band folder")
        item.bands.append(found[(where, item.path.stem)])


def read_yolo(root: Path, class_names: list[str] | None = None) -> DetectionSplit:
    """`images/NAME.ext` with `labels/NAME.txt`: one `class cx cy w h` line per box, fractions of the image."""
    images = {path.stem: path for path in sorted((root / "images").iterdir())
              if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")}
    if not images:
        raise MlexpError(f"{root / 'images'} holds no images ({', '.join(IMAGE_SUFFIXES[:4])} ...)")
    names = class_names if class_names is not None else yolo_class_names(root)
    annotated = {stem: AnnotatedImage(path) for stem, path in images.items()}
    for label_file in sorted((root / "labels").glob("*.txt")):
        if label_file.stem not in annotated:
            raise MlexpError(f"{label_file}: a label file without its image (no images/{label_file.stem}.*)")
        image = annotated[label_file.stem]
        for number, line in enumerate(label_file.read_text().splitlines(), start=1):
            if line.strip():
                label, box = parse_yolo_line(line, f"{label_file} line {number}", names)
                image.labels.append(label)
                image.boxes.append(box)
    if names is None:  # no classes.txt: the ids seen are the classes
        names = [str(n) for n in range(max((max(i.labels, default=-1) for i in annotated.values()), default=-1) + 1)]
    return DetectionSplit(list(annotated.values()), names)


def yolo_class_names(root: Path) -> list[str] | None:
    for folder in (root, root.parent):
        if (folder / CLASSES_FILE).is_file():
            return [line.strip() for line in (folder / CLASSES_FILE).read_text().splitlines() if line.strip()]
    return None


def parse_yolo_line(line: str, where: str, names: list[str] | None) -> tuple[int, tuple[float, float, float, float]]:
    fields = line.split()
    try:
        label, (cx, cy, w, h) = int(fields[0]), map(float, fields[1:])
    except ValueError:
        raise MlexpError(f"{where}: expected `class cx cy w h` (an integer and 4 numbers), got {line.strip()!r}") \
            from None
    check_label(label, where, names)
    return label, check_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, w, h, where, "of the image")


def check_label(label: int, where: str, names: list[str] | None) -> None:
    if label < 0 or (names is not None and label >= len(names)):
        known = f"0..{len(names) - 1} ({CLASSES_FILE} has {len(names)})" if names is not None else ">= 0"
        raise MlexpError(f"{where}: unknown class id {label}; the class ids are {known}")


def check_box(x0: float, y0: float, x1: float, y1: float, w: float, h: float, where: str,
              unit: str) -> tuple[float, float, float, float]:
    """The box as fractions; a non-positive size or a box past its image's edge is an error."""
    if w <= 0 or h <= 0:
        raise MlexpError(f"{where}: a box with non-positive size (width {w:g}, height {h:g})")
    slack = 1e-6  # a box that touches the edge, written with rounding
    if x0 < -slack or y0 < -slack or x1 > 1 + slack or y1 > 1 + slack:
        raise MlexpError(f"{where}: a box outside its image (x {x0:.4g}..{x1:.4g}, y {y0:.4g}..{y1:.4g} {unit}, "
                         "where 0..1 is inside)")
    return max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)


def read_coco(path: Path) -> DetectionSplit:
    """COCO's `images`, `categories` and `annotations` (bbox: x, y, width, height in pixels);
    image files relative to the JSON's folder or its images/ folder."""
    text = path.read_text()
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as error:
        raise MlexpError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise MlexpError(f"{path}: no categories (COCO's `categories`: a list of {{'id', 'name'}})")
    label_of = {category["id"]: index for index, category in enumerate(categories)}
    annotated, sizes = {}, {}
    for entry in coco.get("images", []):
        found = [base / entry["file_name"] for base in (path.parent / "images", path.parent)
                 if (base / entry["file_name"]).is_file()]
        if not found:
            raise MlexpError(f"{path}: image {entry['id']}'s file {entry['file_name']!r} is not in "
                             f"{path.parent / 'images'} nor {path.parent}")
        annotated[entry["id"]] = AnnotatedImage(found[0])
        sizes[entry["id"]] = (float(entry["width"]), float(entry["height"]))
    lines = annotation_lines(text, len(coco.get("annotations", [])))
    for index, note in enumerate(coco.get("annotations", [])):
        where = f"{path} line {lines[index]}" if lines else f"{path} annotation {index} (id {note.get('id')})"
        if note.get("image_id") not in annotated:
            raise MlexpError(f"{where}: annotation of image {note.get('image_id')}, which `images` does not list")
        if note.get("category_id") not in label_of:
            raise MlexpError(f"{where}: unknown class id {note.get('category_id')}; the categories are "
                             f"{sorted(label_of)}")
        width, height = sizes[note["image_id"]]
        x, y, w, h = map(float, note["bbox"])
        box = check_box(x / width, y / height, (x + w) / width, (y + h) / height, w, h, where,
                        f"as fractions of its {width:g}x{height:g} image")
        annotated[note["image_id"]].boxes.append(box)
        annotated[note["image_id"]].labels.append(label_of[note["category_id"]])
    if not annotated:
        raise MlexpError(f"{path}: no images (COCO's `images`)")
    return DetectionSplit(list(annotated.values()), [category["name"] for category in categories])


def annotation_lines(text: str, count: int) -> list[int]:
    """The line each entry of `annotations` starts on (JSON parsers keep no positions), or []
    when the file's layout makes that unsure."""
    key = text.find('"annotations"')
    start = text.find("[", key) + 1 if key >= 0 else 0
    decoder, lines, position = json.JSONDecoder(), [], start
    try:
        while len(lines) < count:
            while text[position] in " \t\r\n,":
                position += 1
            lines.append(text.count("\n", 0, position) + 1)
            _, position = decoder.raw_decode(text, position)
    except (ValueError, IndexError):
        return []
    return lines
