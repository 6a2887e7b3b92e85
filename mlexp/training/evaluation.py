"""The end-of-run report of a split: the metrics a paper reports, per-class figures and the
confusion matrix (CSV, and a PNG with the class names).

`test/*` is computed once, with the best-on-validation weights; `val/*` gets the same report
from the same weights (its per-epoch val/acc and val/loss stay as they were logged).
"""

# Imported where used: `sklearn` and `matplotlib` (about 1 s), because a training run imports this module and its first
# step should not wait for them (only the evaluation at its end does).
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mlexp.training.loop import EvalResult


def split_metrics(result: EvalResult) -> dict[str, float]:
    """acc, loss, top5 (with more than 5 classes), balanced accuracy and macro F1."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    labels, predicted = result.labels.numpy(), result.logits.argmax(dim=1).numpy()
    metrics = {"acc": result.acc, "loss": result.loss,
               "balanced_acc": float(balanced_accuracy_score(labels, predicted)),
               "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0))}
    if result.logits.shape[1] > 5:
        top5 = result.logits.topk(5, dim=1).indices
        metrics["top5"] = float((top5 == result.labels[:, None]).any(dim=1).float().mean())
    return metrics


def per_class(result: EvalResult, class_names: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Precision, recall, F1 and support per class, and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels, predicted = result.labels.numpy(), result.logits.argmax(dim=1).numpy()
    classes = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    table = pd.DataFrame({"class": class_names, "precision": precision, "recall": recall, "f1": f1,
                          "support": support})
    return table, confusion_matrix(labels, predicted, labels=classes)


def write_report(result: EvalResult, class_names: list[str], folder: Path) -> list[Path]:
    """per_class.csv, confusion_matrix.csv and confusion_matrix.png in `folder`."""
    table, confusion = per_class(result, class_names)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "per_class.csv", index=False)
    pd.DataFrame(confusion, index=class_names, columns=class_names).to_csv(folder / "confusion_matrix.csv",
                                                                           index_label="true \\ predicted")
    confusion_figure(confusion, class_names).savefig(folder / "confusion_matrix.png")
    return [folder / name for name in ("per_class.csv", "confusion_matrix.csv", "confusion_matrix.png")]


def confusion_figure(confusion: np.ndarray, class_names: list[str]):
    from matplotlib.figure import Figure

    size = max(4.0, 0.45 * len(class_names) + 2)
    fig = Figure(figsize=(size + 1, size), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    if len(class_names) <= 30:  # counts in the cells, while they stay readable
        for (row, column), count in np.ndenumerate(confusion):
            ax.text(column, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > confusion.max() / 2 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(confusion.sum())} images)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def best_weights_model(module: torch.nn.Module, weights: dict | None) -> torch.nn.Module:
    model = copy.deepcopy(module)
    if weights is not None:
        model.load_state_dict(weights)
    return model
