"""The files `compare` writes: tables (CSV, Markdown, JSON) and plots (PNG), and the text table.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from mlexp.compare import CompareResult

EXCLUDED_SHOWN = 20
INIT_COLOURS = {"pretrained": "steelblue", "scratch": "coral"}
DEFINITIONS = {
    "accuracies": "fractions 0..1 in CSV/JSON; percentages in the Markdown and terminal tables",
    "best_val_acc": "best/val_acc (else the highest val/acc logged)",
    "final_val_acc / final_train_acc": "the last val/acc and train/acc logged",
    "overfit_gap": "final_train_acc - final_val_acc",
    "total_time_s": "time/total_s (the sum of the epoch times)",
    "epoch_time_s": "total_time_s / epochs_run, i.e. the mean of epoch/time_s",
    "trainable_params": "model/params_trainable (else the last train/trainable_params)",
    "epochs_to_95": "first epoch whose val/acc reaches 95% of the best val acc in the run's group "
                    "(mean over the runs that reach it)",
    "gain_5": "val/acc at epoch min(5, last) minus val/acc at epoch 1",
    "pairs": "pretrained and scratch runs of one backbone matched on dataset, strategy, seed and fold; "
             "mean_diff = mean of (pretrained - scratch) best_val_acc, 95% CI from the t distribution",
    "std": "sample standard deviation (ddof=1); empty for a single run",
}


def write_outputs(result: CompareResult, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / name for name in ("groups.csv", "pairs.csv", "runs.csv", "groups.md", "compare.json")]
    result.groups.to_csv(files[0], index=False)
    result.pairs.to_csv(files[1], index=False)
    result.runs.drop(columns=[c for c in result.runs.columns if c.startswith("_")]).to_csv(files[2], index=False)
    files[3].write_text(render_summary(result, markdown=True))
    files[4].write_text(json.dumps(summary_json(result), indent=2, allow_nan=False))
    if plots and not result.groups.empty:
        files += plot_all(result, out_dir)
    return files


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts (NaN -> null, numpy -> Python)."""
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []


def summary_json(result: CompareResult) -> dict[str, Any]:
    return {"experiments": result.experiments, "filter": result.filter_string, "group_by": result.group_by,
            "n_runs": len(result.runs), "groups": records(result.groups),
            "pair_summary": records(result.pair_summary), "pairs": records(result.pairs),
            "excluded": result.excluded, "definitions": DEFINITIONS}


# --- readable tables ------------------------------------------------------------------------------
def pct(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if std is None or math.isnan(std) else f" ± {100 * std:.1f}")


def duration(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if abs(seconds) < 7200 else f"{seconds / 3600:.1f}h"


def count(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def number(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def group_rows(result: CompareResult) -> list[dict[str, str]]:
    rows = []
    for g in result.groups.to_dict("records"):
        rows.append({**{name: str(g[name]) for name in result.group_by}, "runs": str(g["runs"]),
                     "best val %": pct(g["best_val_acc_mean"], g["best_val_acc_std"]),
                     "final val %": pct(g["final_val_acc_mean"], g["final_val_acc_std"]),
                     "final train %": pct(g["final_train_acc_mean"]),
                     "gap pp": pct(g["overfit_gap_mean"]),
                     "total time": duration(g["total_time_s_mean"]), "epoch time": duration(g["epoch_time_s_mean"]),
                     "trainable": count(g["trainable_params_mean"]), "epochs": number(g["epochs_run_mean"]),
                     "ep to 95%": number(g["epochs_to_95_mean"]), "gain@5 pp": pct(g["gain_5_mean"])})
    return rows


def pair_rows(result: CompareResult) -> list[dict[str, str]]:
    rows = []
    for p in result.pair_summary.to_dict("records"):
        ci = "-" if math.isnan(p["ci95_low"]) else f"[{100 * p['ci95_low']:+.1f}, {100 * p['ci95_high']:+.1f}]"
        rows.append({"backbone": p["backbone"], "strategy": p["strategy"], "pairs": str(p["n_pairs"]),
                     "pretrained %": pct(p["pretrained_mean"]), "scratch %": pct(p["scratch_mean"]),
                     "diff pp": f"{100 * p['mean_diff']:+.1f}", "95% CI pp": ci,
                     "p": number(p["p_value"], 3), "time diff": duration(p["time_diff_s"])})
    return rows


def table(rows: list[dict[str, str]], markdown: bool) -> str:
    columns = list(rows[0])
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def render_summary(result: CompareResult, markdown: bool) -> str:
    heading = (lambda text: f"## {text}") if markdown else (lambda text: f"{text}\n{'=' * len(text)}")
    names = ", ".join(result.experiments.values())
    parts = [("# " if markdown else "") + f"mlexp compare: {names}"
             + (f" (filter: {result.filter_string})" if result.filter_string else "")]
    parts.append(heading(f"Groups by {', '.join(result.group_by)} ({len(result.runs)} finished runs)"))
    parts.append(table(group_rows(result), markdown) if not result.groups.empty
                 else "No finished training runs match.")
    parts.append(heading("Pretrained minus scratch, best val acc (paired on dataset, strategy, seed, fold)"))
    parts.append(table(pair_rows(result), markdown) if not result.pair_summary.empty
                 else "No backbone has both pretrained and scratch runs with matching strategy, seed and fold.")
    if result.excluded:
        by_status: dict[str, int] = {}
        for row in result.excluded:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(by_status.items()))
        parts.append(heading(f"Not in the statistics ({counts})"))
        shown = [{k: str(row[k]) for k in ("run_id", "run_name", "status", "experiment", "reason")}
                 for row in result.excluded[:EXCLUDED_SHOWN]]
        more = len(result.excluded) - len(shown)
        parts.append(table(shown, markdown) + (f"\n... and {more} more (see compare.json)" if more > 0 else ""))
    return "\n\n".join(parts) + "\n"


# --- plots ------------------------------------------------------------------------------------------------
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
    for key, name, label, scale in (("val/acc", "val_acc_curves.png", "Validation accuracy (%)", 100.0),
                                    ("val/loss", "val_loss_curves.png", "Validation loss", 1.0)):
        curves = result.curves.get(key)
        if curves is not None and not curves.empty:
            files.append(plot_curves(curves * scale, label, out_dir / name, result.group_by))
    files.append(plot_best_acc(result, out_dir / "best_acc_bar.png"))
    files.append(plot_time(result, out_dir / "time_bar.png"))
    return files


def line_styles(groups: list[str], group_by: list[str]) -> dict[str, dict[str, Any]]:
    """One colour per group ignoring init; solid for pretrained, dashed for scratch."""
    from matplotlib import colormaps

    init_at = group_by.index("init") if "init" in group_by else None
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"].colors
    colours: dict[tuple, Any] = {}
    styles = {}
    for group in groups:
        values = group.split("/")
        init = values.pop(init_at) if init_at is not None and len(values) == len(group_by) else None
        colour = colours.setdefault(tuple(values), palette[len(colours) % len(palette)])
        styles[group] = {"color": colour, "linestyle": "--" if init == "scratch" else "-"}
    return styles


def plot_curves(curves: pd.DataFrame, ylabel: str, path: Path, group_by: list[str]) -> Path:
    columns = 1 if len(curves.columns) <= 30 else 2
    fig = new_figure(10 + 3 * (columns - 1), 5.5, right=0.68 - 0.12 * (columns - 1))
    ax = fig.add_subplot()
    marker = "o" if len(curves.index) <= 30 else None
    styles = line_styles(list(curves.columns), group_by)
    for group in curves.columns:
        series = curves[group].dropna()
        ax.plot(series.index, series.to_numpy(), marker=marker, markersize=3, linewidth=1.6, label=group,
                **styles[group])
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel}: mean over each group's runs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if len(curves.columns) > 8 else 9, ncol=columns, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path)
    return path


def bar_colours(result: CompareResult) -> list[str]:
    inits = result.groups["init"] if "init" in result.group_by else [None] * len(result.groups)
    return [INIT_COLOURS.get(init, "grey") for init in inits]


def labels(result: CompareResult) -> list[str]:
    return ["/".join(str(row[name]) for name in result.group_by) for row in result.groups.to_dict("records")]


def plot_bars(ax, result: CompareResult, column: str, scale: float, ylabel: str) -> None:
    means = result.groups[f"{column}_mean"].to_numpy(dtype=float) * scale
    stds = result.groups[f"{column}_std"].fillna(0).to_numpy(dtype=float) * scale
    positions = range(len(means))
    ax.bar(positions, means, yerr=stds, capsize=3, color=bar_colours(result))
    ax.set_xticks(list(positions), labels(result), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, axis="y")


def plot_best_acc(result: CompareResult, path: Path) -> Path:
    fig = new_figure(max(6, 0.45 * len(result.groups) + 3), 6, bottom=0.32, left=0.13)
    ax = fig.add_subplot()
    plot_bars(ax, result, "best_val_acc", 100.0, "Best validation accuracy (%)")
    ax.set_title("Best validation accuracy per group (mean ± std over runs)")
    fig.savefig(path)
    return path


def plot_time(result: CompareResult, path: Path) -> Path:
    fig = new_figure(max(6, 0.45 * len(result.groups) + 3), 9, bottom=0.2, hspace=0.08, top=0.94, left=0.13)
    total, per_epoch = fig.subplots(2, 1, sharex=True)
    plot_bars(total, result, "total_time_s", 1 / 60, "Total training time (min)")
    plot_bars(per_epoch, result, "epoch_time_s", 1.0, "Mean epoch time (s)")
    total.set_title("Training time per group (mean ± std over runs)")
    fig.savefig(path)
    return path
