"""Official splits: partitions read from split files or a split manifest, and fold selections.

Benchmarks publish their splits so that results are comparable: DTD ships ten partitions
as `labels/train1.txt, val1.txt, test1.txt ... test10.txt`, one image path per line
(relative to `images/`, the class being the path's first folder). A dataset folder laid out
that way trains on those lines exactly; `--fold N` chooses partition N. Any other official
split can be given as a manifest (`--splits FILE`): a CSV with columns `path`, `class` and
one column per fold (`1`, `2`, ... or `fold1`, `fold2`, ...) holding train, val, test or
nothing; or the same as JSON, a list of {"path", "class", "folds": {"1": "train", ...}}.

Fold numbers here are the files' own (DTD's start at 1); a sweep's `--folds 1-3` or
`--folds 1,3,5` selects some of them (`parse_folds`).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlexp.errors import MlexpError

CONTEXTS = ("train", "val", "test")
SPLIT_FILE = re.compile(r"^(train|val|test)(\d+)\.txt$")
FOLD_COLUMN = re.compile(r"^(?:fold)?(\d+)$")


@dataclass(frozen=True)
class Partition:
    """One fold of an official split: which images train, validate and test."""

    number: int
    images_root: Path  # the lines' paths are relative to it
    members: dict[str, list[tuple[str, str]]]  # train/val/test -> [(relative path, class name)], in file order
    source: str  # what the user would look at: the split files or the manifest

    @property
    def classes(self) -> list[str]:
        return sorted({name for rows in self.members.values() for _, name in rows})


def parse_folds(text: str, option: str = "--folds") -> list[int]:
    """'1-10' -> [1..10]; '1,3,5' -> [1, 3, 5]; '1-3,7' -> [1, 2, 3, 7]; in order, without repeats."""
    chosen: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        bounds = part.split("-")
        if not part or len(bounds) > 2 or not all(bound.isdigit() for bound in bounds):
            raise MlexpError(f"{option} {text!r}: expected fold numbers, a range or a list, e.g. 2, 1-10 or 1,3,5")
        low, high = int(bounds[0]), int(bounds[-1])
        if high < low:
            raise MlexpError(f"{option} {text!r}: the range {part} runs backwards")
        chosen += [fold for fold in range(low, high + 1) if fold not in chosen]
    return chosen


def is_fold_list(text: str) -> bool:
    """'1-3' or '1,3': more than one fold (what a sweep takes, not a single run)."""
    return bool(re.fullmatch(r"\s*\d+\s*([-,]\s*\d+\s*)+", str(text)))


# --- split files (the DTD layout) -----------------------------------------------------------
def split_file_folder(data: Path) -> Path | None:
    """DATA/labels when it holds split files (train{N}.txt with val{N}.txt)."""
    labels = data / "labels"
    return labels if labels.is_dir() and split_file_numbers(labels) else None


def split_file_numbers(labels: Path) -> list[int]:
    found: dict[int, set[str]] = {}
    for path in labels.iterdir():
        match = SPLIT_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), set()).add(match.group(1))
    return sorted(number for number, kinds in found.items() if {"train", "val"} <= kinds)


def read_split_files(data: Path, number: int) -> Partition:
    """Partition `number` of DATA/labels/: each line a path under DATA/images/ (else DATA/)."""
    labels = data / "labels"
    images_root = data / "images" if (data / "images").is_dir() else data
    members = {}
    for context in CONTEXTS:
        path = labels / f"{context}{number}.txt"
        if not path.is_file():
            if context == "test":
                continue
            raise MlexpError(f"{path} is missing: partition {number} needs {context}{number}.txt beside the others")
        lines = [line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()]
        rows = []
        for line in lines:
            if "/" not in line:
                raise MlexpError(f"{path}: line {line!r} names no class folder (expected CLASS/IMAGE, as DTD's "
                                 "lines are banded/banded_0002.jpg)")
            rows.append((line, line.split("/", 1)[0]))
        members[context] = rows
    return checked(Partition(number, images_root, members, f"{labels}/*{number}.txt"))


# --- a split manifest (--splits FILE) --------------------------------------------------------
def manifest_rows(path: Path, need_class: bool = True) -> list[dict]:
    """The manifest as [{"path", "class", "folds": {N: split}}]. need_class False: a detector's
    manifest, whose images' classes are in their annotations (a class column may be left out)."""
    if not path.is_file():
        raise MlexpError(f"--splits {path}: no such file (expected a CSV or JSON split manifest)")
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
            return [{"path": row["path"], "class": row["class"] if need_class else row.get("class", ""),
                     "folds": {int(fold): (split or "") for fold, split in row["folds"].items()}} for row in rows]
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = {name: int(m.group(1)) for name in reader.fieldnames or [] if (m := FOLD_COLUMN.match(name))}
            needed = {"path", "class"} if need_class else {"path"}
            if not needed <= set(reader.fieldnames or []) or not columns:
                found = ", ".join(reader.fieldnames or []) or "none"
                raise MlexpError(f"--splits {path}: expected the columns {', '.join(sorted(needed))} and one per fold "
                                 f"(1, 2, ... or fold1, fold2, ...), found {found}")
            return [{"path": row["path"], "class": row.get("class") or "",
                     "folds": {fold: (row[name] or "").strip() for name, fold in columns.items()}} for row in reader]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise MlexpError(f"--splits {path}: not a split manifest ({type(error).__name__}: {error}); expected "
                         "[{\"path\", \"class\", \"folds\": {\"1\": \"train\", ...}}] or a CSV") from None


def manifest_numbers(path: Path, need_class: bool = True) -> list[int]:
    return sorted({fold for row in manifest_rows(path, need_class) for fold in row["folds"]})


def read_manifest(path: Path, data: Path, number: int, need_class: bool = True) -> Partition:
    members: dict[str, list[tuple[str, str]]] = {context: [] for context in CONTEXTS}
    for row in manifest_rows(path, need_class):
        split = row["folds"].get(number, "")
        if split not in ("", *CONTEXTS):
            raise MlexpError(f"--splits {path}: {row['path']} is {split!r} in fold {number}; a split is train, val, "
                             "test or empty")
        if split:
            members[split].append((row["path"].replace("\\", "/"), str(row["class"])))
    if not members["test"]:
        del members["test"]
    return checked(Partition(number, data, members, str(path)))


def checked(partition: Partition) -> Partition:
    """Every listed image exists, none is in two splits, and train and val hold images."""
    seen: dict[str, str] = {}
    for context, rows in partition.members.items():
        for relative, _ in rows:
            if relative in seen:
                raise MlexpError(f"{partition.source}: {relative} is in both {seen[relative]} and {context} of "
                                 f"fold {partition.number}")
            seen[relative] = context
    for context in ("train", "val"):
        if not partition.members.get(context):
            raise MlexpError(f"{partition.source}: fold {partition.number} has no {context} images")
    missing = [relative for relative in seen if not (partition.images_root / relative).is_file()]
    if missing:
        raise MlexpError(f"{partition.source}: {len(missing)} listed image(s) are not under {partition.images_root}, "
                         f"e.g. {missing[0]}")
    return partition
