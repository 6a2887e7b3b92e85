"""Splits: which images train, validate and test. A fixed split seed, not the training seed,
so runs that differ only in `--seed` are evaluated on the same validation images (what makes
seed-paired comparisons meaningful); every class must be large enough for the split asked."""

# Imported where used: `sklearn` (about 1 s), which only a run that splits a folder needs.
from __future__ import annotations

import math

import numpy as np

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.option_values import BUILT_IN

SPLIT_SEED = 0


def split_indices(labels: np.ndarray, cfg: TrainConfig, test_split: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices. The test part (`test_split` of the data, stratified)
    is held out first, with the fixed split seed: the same images for every seed and fold.
    The rest is split as asked: the chosen k-fold, else a stratified val-split."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    indices = np.arange(len(labels))
    test_idx = np.array([], dtype=int)
    if test_split > 0:
        try:
            indices, test_idx = train_test_split(indices, test_size=test_split, stratify=labels,
                                                 random_state=SPLIT_SEED)
        except ValueError as error:  # too few images per class for a stratified split
            raise MlexpError(f"--test-split {test_split} cannot hold out a stratified test set from "
                             f"{len(labels)} images: {error}") from None
        indices, test_idx = np.sort(indices), np.sort(test_idx)
    rest = labels[indices]
    if cfg.folds:
        folds = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=SPLIT_SEED)
        train_idx, val_idx = list(folds.split(indices, rest))[cfg.fold]
        return indices[train_idx], indices[val_idx], test_idx
    train_idx, val_idx = train_test_split(np.arange(len(indices)), test_size=cfg.val_split, stratify=rest,
                                          random_state=SPLIT_SEED)
    return np.sort(indices[train_idx]), np.sort(indices[val_idx]), test_idx


def check_split(counts: dict[str, int], cfg: TrainConfig, where: str) -> None:
    """Reject, with the class and its count, what split_indices' scikit-learn splitters refuse
    or do badly. k-fold: every class needs >= K images (StratifiedKFold otherwise leaves a class
    out of some validation folds, or fails). val-split, train_test_split(stratify=...)'s own
    rules: every class >= 2 images, and both parts (ceil(val_split * n) held out, the rest
    trained on) at least as large as the number of classes."""
    folder = cfg.data not in BUILT_IN
    name, smallest = min(counts.items(), key=lambda item: item[1])
    if cfg.folds:
        if smallest < cfg.folds:
            fixes = [f"lower --folds to {smallest}"] if smallest >= 2 else []  # --folds 1 is no k-fold
            fixes += [f"add images to {name!r}", "pass --val-dir"] if folder else []
            raise MlexpError(f"class {name!r} in {where} has {smallest} image(s), too few for --folds "
                             f"{cfg.folds} (each class needs at least one image per fold"
                             f"{_others(counts, cfg.folds)}); {_either(fixes)}")
        return
    total, classes = sum(counts.values()), len(counts)
    held_out = math.ceil(cfg.val_split * total)  # scikit-learn's own rounding
    kept = total - held_out
    if smallest < 2:
        raise MlexpError(f"class {name!r} in {where} has {smallest} image, too few for a --val-split "
                         f"(a stratified split needs at least 2 per class: one to train on, one to "
                         f"validate{_others(counts, 2)}); add images to {name!r} or pass --val-dir "
                         f"with a separate validation folder")
    if kept < classes:
        raise MlexpError(f"--val-split {cfg.val_split} keeps {kept} of {total} images in {where} for "
                         f"training, fewer than its {classes} classes; lower --val-split"
                         + (", add images, or pass --val-dir" if folder else ""))
    if held_out < classes:
        raise MlexpError(f"--val-split {cfg.val_split} holds out {held_out} of {total} images in "
                         f"{where}, fewer than its {classes} classes (a stratified split needs one "
                         f"per class); raise --val-split" + (", add images, or pass --val-dir" if folder else ""))


def _others(counts: dict[str, int], needed: int) -> str:
    """"; N other class(es) have fewer than K too" when the named class is not the only one."""
    others = sum(1 for count in counts.values() if count < needed) - 1
    return f"; {others} other class(es) have fewer than {needed} too" if others else ""


def _either(fixes: list[str]) -> str:
    return fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])}, or {fixes[-1]}"
