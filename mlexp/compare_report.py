"""What `compare` writes: tables (CSV, Markdown, JSON), plots (PNG), the text table, and the
MLflow run they are logged to.

Every abbreviated column of the printed and Markdown tables is defined under its table; a time
column has one unit (s, min or h, in its header). Plots use matplotlib's object API with the Agg
canvas (no pyplot state, no display needed); each group has its own colour in every plot.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mlexp.compare import CompareResult

EXCLUDED_SHOWN = 20
TIME_UNITS = (("s", 1.0, 120.0), ("min", 60.0, 7200.0), ("h", 3600.0, math.inf))  # unit, seconds, below
DEFINITIONS = {
    "accuracies": "fractions 0..1 in CSV/JSON; percentages in the Markdown and terminal tables",
    "backbone": "the catalogue name, as the sweep summary prints it (resnet18_scratch, vit_small)",
    "arch": "the architecture without its init (tag mlexp.backbone); pairs are matched on it",
    "best_val_acc": "best/val_acc (else the highest val/acc logged)",
    "final_val_acc / final_train_acc": "the last val/acc and train/acc logged",
    "overfit_gap": "final_train_acc - final_val_acc",
    "total_time_s": "time/total_s (the sum of the epoch times)",
    "epoch_time_s": "total_time_s / epochs_run, i.e. the mean of epoch/time_s",
    "trainable_params": "model/params_trainable (else the last train/trainable_params)",
    "epochs_to_95": "first epoch whose val/acc reaches 95% of the best val acc in the run's group "
                    "(mean over the runs that reach it)",
    "gain_5": "val/acc at epoch min(5, last) minus val/acc at the first epoch logged",
    "pairs": "pretrained and scratch runs of one arch matched on dataset, strategy, seed and fold; "
             "mean_diff = mean of (pretrained - scratch) best_val_acc, 95% CI from the t distribution",
    "std": "sample standard deviation (ddof=1); empty for a single run",
}
# What each column of the printed tables means (a time column's header adds its unit).
COLUMN_NOTES = {
    "backbone": "catalogue name, as in the sweep summary (resnet18_scratch: resnet18 trained from scratch)",
    "arch": "architecture, pretrained and scratch runs together",
    "init": "initial weights: pretrained or scratch",
    "strategy": "fine-tuning strategy (full, linear probe, gradual unfreezing, ...)",
    "experiment": "MLflow experiment of the runs",
    "runs": "finished training runs in the group",
    "best val %": "best validation accuracy of a run, mean ± std over the group's runs",
    "final val %": "validation accuracy at the last epoch, mean ± std",
    "final train %": "training accuracy at the last epoch, mean",
    "gap pp": "overfitting gap: final train % minus final val %, mean, in percentage points",
    "total time": "training time of a run (sum of its epoch times), mean",
    "epoch time": "time per epoch (total time / epochs), mean",
    "trainable": "trainable parameters, mean (K thousand, M million, B billion)",
    "epochs": "epochs run, mean",
    "ep to 95%": "first epoch at which val acc reaches 95% of the best val acc in the group, mean over "
                 "the runs that reach it (convergence speed)",
    "gain@5 pp": "val acc at epoch 5 (or the last, if earlier) minus val acc at epoch 1, mean, in "
                 "percentage points (early learning speed)",
    "±": "sample standard deviation over the group's runs (none for a single run)",
}
PAIR_NOTES = {
    "backbone": "architecture whose pretrained and scratch runs are paired",
    "strategy": "fine-tuning strategy of the pairs (all: every strategy together)",
    "pairs": "pretrained/scratch run pairs matched on dataset, strategy, seed and fold",
    "pretrained %": "best val acc of the paired pretrained runs, mean",
    "scratch %": "best val acc of the paired scratch runs, mean",
    "diff pp": "pretrained minus scratch best val acc, mean over the pairs, in percentage points",
    "95% CI pp": "95% confidence interval of diff pp (paired t distribution)",
    "p": "two-sided p-value of the paired t-test (no difference)",
    "time diff": "pretrained minus scratch total training time, mean over the pairs",
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
            "excluded": result.excluded, "not_training_runs": result.ignored, "mlflow_reads": result.reads,
            "definitions": DEFINITIONS}


# --- readable tables ------------------------------------------------------------------------------
def pct(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if std is None or math.isnan(std) else f" ± {100 * std:.1f}")


def time_unit(seconds: Any) -> tuple[str, float]:
    """One unit for a whole column: s below 2 min, min below 2 h, else h (by the largest value)."""
    finite = [abs(float(v)) for v in seconds if v is not None and not math.isnan(float(v))]
    top = max(finite, default=0.0)
    return next((unit, size) for unit, size, below in TIME_UNITS if top < below)


def in_unit(seconds: float, size: float, sign: str = "") -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds / size:{sign}.1f}"


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
    total_unit, total_size = time_unit(result.groups["total_time_s_mean"])
    epoch_unit, epoch_size = time_unit(result.groups["epoch_time_s_mean"])
    rows = []
    for g in result.groups.to_dict("records"):
        rows.append({**{name: str(g[name]) for name in result.group_by}, "runs": str(g["runs"]),
                     "best val %": pct(g["best_val_acc_mean"], g["best_val_acc_std"]),
                     "final val %": pct(g["final_val_acc_mean"], g["final_val_acc_std"]),
                     "final train %": pct(g["final_train_acc_mean"]),
                     "gap pp": pct(g["overfit_gap_mean"]),
                     f"total time ({total_unit})": in_unit(g["total_time_s_mean"], total_size),
                     f"epoch time ({epoch_unit})": in_unit(g["epoch_time_s_mean"], epoch_size),
                     "trainable": count(g["trainable_params_mean"]), "epochs": number(g["epochs_run_mean"]),
                     "ep to 95%": number(g["epochs_to_95_mean"]), "gain@5 pp": pct(g["gain_5_mean"])})
    return rows


def pair_rows(result: CompareResult) -> list[dict[str, str]]:
    unit, size = time_unit(result.pair_summary["time_diff_s"])
    rows = []
    for p in result.pair_summary.to_dict("records"):
        ci = "-" if math.isnan(p["ci95_low"]) else f"[{100 * p['ci95_low']:+.1f}, {100 * p['ci95_high']:+.1f}]"
        rows.append({"backbone": p["backbone"], "strategy": p["strategy"], "pairs": str(p["n_pairs"]),
                     "pretrained %": pct(p["pretrained_mean"]), "scratch %": pct(p["scratch_mean"]),
                     "diff pp": f"{100 * p['mean_diff']:+.1f}", "95% CI pp": ci,
                     "p": number(p["p_value"], 3), f"time diff ({unit})": in_unit(p["time_diff_s"], size, "+")})
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


def legend(rows: list[dict[str, str]], notes: dict[str, str], markdown: bool) -> str:
    """What each column of the table means: one line per column that has a note, and ± if used."""
    entries = [(column, notes[column.split(" (")[0]]) for column in rows[0] if column.split(" (")[0] in notes]
    if "±" in notes and any(" ± " in value for row in rows for value in row.values()):
        entries.append(("±", notes["±"]))
    if markdown:
        return "Columns:\n\n" + "\n".join(f"- **{column}**: {note}" for column, note in entries)
    width = max(len(column) for column, _ in entries)
    return "Columns:\n" + "\n".join(f"  {column.ljust(width)}  {note}" for column, note in entries)


def render_summary(result: CompareResult, markdown: bool) -> str:
    heading = (lambda text: f"## {text}") if markdown else (lambda text: f"{text}\n{'=' * len(text)}")
    names = ", ".join(result.experiments.values())
    parts = [("# " if markdown else "") + f"mlexp compare: {names}"
             + (f" (filter: {result.filter_string})" if result.filter_string else "")]
    parts.append(heading(f"Groups by {', '.join(result.group_by)} ({len(result.runs)} finished runs)"))
    if result.groups.empty:
        parts.append("No finished training runs match.")
    else:
        rows = group_rows(result)
        parts += [table(rows, markdown), legend(rows, COLUMN_NOTES, markdown)]
    parts.append(heading("Pretrained minus scratch, best val acc (paired on dataset, strategy, seed, fold)"))
    if result.pair_summary.empty:
        parts.append("No backbone has both pretrained and scratch runs with matching strategy, seed and fold.")
    else:
        rows = pair_rows(result)
        parts += [table(rows, markdown), legend(rows, PAIR_NOTES, markdown)]
    if result.excluded:
        parts += excluded_section(result, heading, markdown)
    if result.ignored:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(result.ignored.items()))
        parts.append(f"Not training runs, left out: {kinds}.")
    return "\n\n".join(parts) + "\n"


def excluded_section(result: CompareResult, heading, markdown: bool) -> list[str]:
    """Training runs that should have counted but could not (not finished, or no val/acc)."""
    by_status: dict[str, int] = {}
    for row in result.excluded:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(by_status.items()))
    shown = [{k: str(row[k]) for k in ("run_id", "run_name", "status", "experiment", "reason")}
             for row in result.excluded[:EXCLUDED_SHOWN]]
    more = len(result.excluded) - len(shown)
    return [heading(f"Training runs not in the statistics ({counts})"),
            table(shown, markdown) + (f"\n... and {more} more (see compare.json)" if more > 0 else "")]


# --- the MLflow run -------------------------------------------------------------------------------------
def log_compare_run(tracking_uri: str, result: CompareResult, out_dir: Path, experiment: str, run_name: str,
                    project_run_id: str | None = None) -> str:
    """Log summary params, metrics and out_dir (as artifacts under compare/) to a new run in
    `experiment`, or to `project_run_id` (the run `mlflow run` made, which it ends), through
    the tracking outbox."""
    import mlexp
    from mlexp import tracking

    tracker = tracking.open_run(tracking_uri, experiment, run_name, run_id=project_run_id, heartbeat=False,
                                tags={"mlexp.kind": "compare", "mlexp.version": mlexp.__version__})
    try:
        statuses = [row["status"] for row in result.excluded]
        metrics = {"runs": len(result.runs), "groups": len(result.groups), "excluded": len(result.excluded),
                   "running": statuses.count("RUNNING"), "failed": statuses.count("FAILED"),
                   "not_training": sum(result.ignored.values())}
        if not result.pair_summary.empty:  # each backbone's first row is over all its strategies
            for row in result.pair_summary.drop_duplicates("backbone").to_dict("records"):
                metrics[f"pretrain_gain/{row['backbone']}"] = row["mean_diff"]
                metrics[f"pretrain_pairs/{row['backbone']}"] = row["n_pairs"]
        # Prefixed: under `mlflow run` the entry point's own parameters are already on the run.
        tracker.log_params({"compare.experiments": ",".join(result.experiments.values())[:6000],
                            "compare.filter": result.filter_string or "", "compare.group_by": ",".join(result.group_by)})
        tracker.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))},
                            step=0)
        tracker.log_artifacts(out_dir, "compare", copy=True)  # the user keeps out_dir
    except BaseException as error:
        tracker.finish("FAILED", error=f"{type(error).__name__}: {error}")
        raise
    if project_run_id:  # `mlflow run` ends its own run
        delivery = tracker.abandon(wait_s=tracking.run.grace_s())
    else:
        delivery = tracker.finish("FINISHED")
    if not delivery.complete:
        print(f"mlexp: compare run {delivery.run_id}: {delivery.describe()}", file=sys.stderr)
    return tracker.run_id


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
    styles = group_styles(result)
    for key, name, label, scale in (("val/acc", "val_acc_curves.png", "Validation accuracy (%)", 100.0),
                                    ("val/loss", "val_loss_curves.png", "Validation loss", 1.0)):
        curves = result.curves.get(key)
        if curves is not None and not curves.empty:
            files.append(save(curves_figure(curves * scale, label, styles), out_dir / name))
    files.append(save(best_acc_figure(result, styles), out_dir / "best_acc_bar.png"))
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


def curves_figure(curves: pd.DataFrame, ylabel: str, styles: dict[str, dict[str, Any]]):
    from matplotlib.ticker import MaxNLocator

    columns = 1 if len(curves.columns) <= 30 else 2
    fig = new_figure(10 + 3 * (columns - 1), 5.5, right=0.68 - 0.12 * (columns - 1))
    ax = fig.add_subplot()
    marker = "o" if len(curves.index) <= 30 else None
    for group in curves.columns:
        series = curves[group].dropna()
        ax.plot(series.index, series.to_numpy(), marker=marker, markersize=3, linewidth=1.6, label=group,
                **styles.get(group, {}))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel}: mean over each group's runs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if len(curves.columns) > 8 else 9, ncol=columns, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
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
    plot_bars(ax, result, "best_val_acc", 100.0, "Best validation accuracy (%)", styles, values=True)
    means = result.groups["best_val_acc_mean"].to_numpy(dtype=float) * 100
    stds = result.groups["best_val_acc_std"].fillna(0).to_numpy(dtype=float) * 100
    bottom, top = zoomed_limits(means - stds, means + stds)
    ax.set_ylim(bottom, top)
    ax.set_title("Best validation accuracy per group\n(mean ± std over runs"
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
