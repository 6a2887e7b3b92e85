"""The PNG plots of `compare`: curves with bands, paired differences, best accuracy and time
bars. matplotlib's object API with the Agg canvas (no pyplot state, no display needed); each
group has its own colour in every plot."""

# Imported where used: `matplotlib`, which compare starts importing on a thread while the
# server answers (compare.warm_up), so its 0.4 s overlap the wait.
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlexp.analysis.tables import time_unit

if TYPE_CHECKING:
    from mlexp.analysis.result import CompareResult


def new_figure(width: float, height: float, **margins: float):
    """A figure with fixed margins (a layout engine would cost ~0.1 s a figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(**{"left": 0.08, "right": 0.97, "top": 0.9, "bottom": 0.12, **margins})
    return fig


def warm_up() -> None:
    """Import matplotlib and load its fonts (run on a thread while the server is busy)."""
    fig = new_figure(1, 1)
    fig.add_subplot().set_title("warm-up")
    fig.canvas.draw()


def plot_all(result: CompareResult, out_dir: Path) -> list[Path]:
    files = []
    styles = group_styles(result)
    score = result.score
    for key, name, label, scale in ((score.curve, f"val_{score.name}_curves.png", f"Validation {score.label} (%)",
                                     100.0),
                                    ("val/loss", "val_loss_curves.png", "Validation loss", 1.0)):
        curves = result.curves.get(key)
        if curves is not None and not curves.empty:
            files.append(save(curves_figure(curves, scale, label, styles), out_dir / name))
    if not result.diff_curves.empty:
        files.append(save(difference_figure(result.diff_curves, score.worded("val acc")), out_dir / "pretrain_gain_curves.png"))
    files.append(save(best_acc_figure(result, styles), out_dir / f"best_{score.name}_bar.png"))
    files.append(save(time_figure(result, styles), out_dir / "time_bar.png"))
    return files


def save(fig, path: Path) -> Path:
    fig.savefig(path)
    return path


def labels(result: CompareResult) -> list[str]:
    return ["/".join(str(row[name]) for name in result.group_by) for row in result.groups.to_dict("records")]


def group_styles(result: CompareResult) -> dict[str, dict[str, Any]]:
    """A colour of its own for every group (the same in every plot); dashed lines for scratch groups."""
    from matplotlib import colormaps

    names = labels(result)
    palette = list(colormaps["tab10"].colors)
    if len(names) > len(palette):
        palette = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors, *colormaps["tab20c"].colors]
    if len(names) > len(palette):
        palette = [tuple(c) for c in colormaps["turbo"](np.linspace(0, 1, len(names)))]
    runs = result.runs.assign(_label=["/".join(str(row[n]) for n in result.group_by)
                                      for row in result.runs.to_dict("records")])
    scratch = {label for label, inits in runs.groupby("_label")["_init"] if set(inits) == {"scratch"}}
    return {name: {"color": palette[i], "linestyle": "--" if name in scratch else "-"}
            for i, name in enumerate(names)}


def curves_figure(curves: pd.DataFrame, scale: float, ylabel: str, styles: dict[str, dict[str, Any]]):
    """Each group's mean curve with its 95% band over runs (seeds and folds)."""
    from matplotlib.ticker import MaxNLocator

    groups = list(dict.fromkeys(curves["group"]))
    columns = 1 if len(groups) <= 30 else 2
    fig = new_figure(10 + 3 * (columns - 1), 5.5, right=0.68 - 0.12 * (columns - 1))
    ax = fig.add_subplot()
    marker = "o" if curves["epoch"].nunique() <= 30 else None
    for group, rows in curves.groupby("group", sort=False):
        style = styles.get(group, {})
        ax.plot(rows["epoch"], rows["mean"] * scale, marker=marker, markersize=3, linewidth=1.6, label=group, **style)
        # Accuracies lie in [0, 100] and losses above 0: a t band over 2-3 runs can reach past both.
        low, high = (rows["low"] * scale).clip(lower=0), rows["high"] * scale
        ax.fill_between(rows["epoch"], low, high.clip(upper=100) if scale == 100 else high, alpha=0.15, linewidth=0,
                        color=style.get("color"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel}: mean over each group's runs, 95% t band (wide with few runs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if len(groups) > 8 else 9, ncol=columns, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def difference_figure(diffs: pd.DataFrame, label: str = "val acc"):
    """Pretrained minus scratch val acc by epoch, per backbone, with the 95% band over pairs."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(10, 5.5, right=0.75)
    ax = fig.add_subplot()
    palette = colormaps["tab10"].colors
    for i, (backbone, rows) in enumerate(diffs.groupby("backbone", sort=True)):
        colour = palette[i % len(palette)]
        ax.plot(rows["epoch"], rows["mean"] * 100, marker="o", markersize=3, label=backbone, color=colour)
        ax.fill_between(rows["epoch"], rows["low"] * 100, rows["high"] * 100, alpha=0.2, linewidth=0, color=colour)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Epoch")
    ax.set_ylabel(f"Pretrained minus scratch {label} (pp)")
    ax.set_title("Pretraining gain by epoch: mean over seed/fold pairs, 95% band")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_bars(ax, result: CompareResult, column: str, scale: float, ylabel: str, styles: dict[str, dict[str, Any]],
              values: bool = False) -> None:
    """Mean ± std bars, one colour per group; `values`: the mean written above each bar."""
    means = result.groups[f"{column}_mean"].to_numpy(dtype=float) * scale
    stds = result.groups[f"{column}_std"].fillna(0).to_numpy(dtype=float) * scale
    positions = list(range(len(means)))
    ax.bar(positions, means, yerr=stds, capsize=3, color=[styles[name]["color"] for name in labels(result)])
    if values:
        for x, mean, std in zip(positions, means, stds):
            if math.isfinite(mean):
                ax.text(x, mean + std, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, labels(result), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, axis="y")


def zoomed_limits(low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
    """A y range around the data (never below 0), with room above for the value labels."""
    finite_low, finite_high = low[np.isfinite(low)], high[np.isfinite(high)]
    if not len(finite_low) or not len(finite_high):
        return 0.0, 100.0
    bottom, top = float(finite_low.min()), float(finite_high.max())
    pad = 0.15 * max(top - bottom, 2.0)
    return max(0.0, bottom - pad), top + 2 * pad


def best_acc_figure(result: CompareResult, styles: dict[str, dict[str, Any]] | None = None):
    styles = styles or group_styles(result)
    fig = new_figure(max(6, 0.45 * len(result.groups) + 3), 6, bottom=0.32, left=0.13, top=0.87)
    ax = fig.add_subplot()
    plot_bars(ax, result, "best_val_acc", 100.0, f"Best validation {result.score.label} (%)", styles, values=True)
    means = result.groups["best_val_acc_mean"].to_numpy(dtype=float) * 100
    stds = result.groups["best_val_acc_std"].fillna(0).to_numpy(dtype=float) * 100
    bottom, top = zoomed_limits(means - stds, means + stds)
    ax.set_ylim(bottom, top)
    ax.set_title(f"Best validation {result.score.label} per group\n(mean ± std over runs"
                 + (f"; the y axis starts at {bottom:.0f}%)" if bottom > 0 else ")"), fontsize=11)
    return fig


def time_figure(result: CompareResult, styles: dict[str, dict[str, Any]] | None = None):
    styles = styles or group_styles(result)
    fig = new_figure(max(6, 0.45 * len(result.groups) + 3), 9, bottom=0.2, hspace=0.08, top=0.94, left=0.13)
    total, per_epoch = fig.subplots(2, 1, sharex=True)
    total_unit, total_size = time_unit(result.groups["total_time_s_mean"])
    epoch_unit, epoch_size = time_unit(result.groups["epoch_time_s_mean"])
    plot_bars(total, result, "total_time_s", 1 / total_size, f"Total training time ({total_unit})", styles)
    plot_bars(per_epoch, result, "epoch_time_s", 1 / epoch_size, f"Mean epoch time ({epoch_unit})", styles)
    total.set_title("Training time per group (mean ± std over runs)")
    return fig
