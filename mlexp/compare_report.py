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

from mlexp import stats

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
    "pairs": "pretrained and scratch runs of one arch matched on dataset, strategy, seed and fold",
    "comparisons": "one row per paired comparison (kind init, strategy, backbone, interaction, time, "
                   "convergence): mean_diff = mean of A - B over matched pairs; ci_low/ci_high: 95% studentized "
                   "bootstrap interval (none below 4 pairs, with zero spread or ties); p_value: sign-flip permutation "
                   "test (exact up to 16 pairs); p_holm: Holm-adjusted over the whole report; win_prob: share "
                   "of pairs A wins (ties half) with a Wilson interval; detectable: smallest difference "
                   "detectable at 80% power (n < 5)",
    "metric_*": "the compared metric per group: n, mean, std, 95% bootstrap interval, median, "
                "interquartile mean (n >= 4)",
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
COMPARISON_NOTES = {
    "backbone": "architecture (pretrained and scratch runs together)",
    "init": "initial weights of both sides",
    "strategy": "fine-tuning strategy of both sides (all: every strategy, matched on it)",
    "A - B": "what is compared: A minus B",
    "n": "matched pairs (same dataset, seed and fold; same strategy or init where those are not compared)",
    "A": "mean of A over the pairs",
    "B": "mean of B over the pairs",
    "diff": "mean of A - B over the pairs",
    "95% CI": "95% studentized bootstrap interval of diff; none below 4 pairs (n too small), when every pair "
              "differs by the same amount (no spread) or when ties leave too few distinct resamples (ties)",
    "P(A>B)": "share of pairs A wins (ties half), with its 95% Wilson interval",
    "p (Holm)": "sign-flip permutation p-value of diff = 0 (exact up to 16 pairs), Holm-adjusted over every "
                "comparison of the report",
    "note": "what limits the row: too few pairs, unequal epoch budgets, the level reached",
}
METRIC_NOTES = {
    "n": "runs with the metric",
    "mean ± std": "mean and sample standard deviation over the group's runs",
    "95% CI": "95% studentized bootstrap interval of the mean (none below 4 runs, with zero spread or ties)",
    "median": "median over the runs",
    "IQM": "interquartile mean: mean of the middle 50% of runs (from 4 runs; robust to one diverged seed)",
}
KIND_TITLES = {
    "init": "Pretrained minus scratch, {metric}",
    "interaction": "Does pretraining help some backbones more? Gain of A minus gain of B, {metric}",
    "strategy": "Strategy A minus strategy B, {metric}",
    "backbone": "Backbone A minus backbone B, {metric}",
    "time": "Training time, pretrained minus scratch",
    "convergence": "Convergence, pretrained minus scratch: epochs to reach a level of val acc",
}


def write_outputs(result: CompareResult, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    from mlexp.compare_answers import report_markdown

    names = ("groups.csv", "pairs.csv", "comparisons.csv", "runs.csv", "groups.md", "compare.json", "report.md")
    files = [out_dir / name for name in names]
    result.groups.to_csv(files[0], index=False)
    result.pairs.drop(columns=["points_a", "points_b"], errors="ignore").to_csv(files[1], index=False)
    result.comparisons.to_csv(files[2], index=False)
    result.runs.drop(columns=[c for c in result.runs.columns if c.startswith("_")]).to_csv(files[3], index=False)
    files[4].write_text(render_summary(result, markdown=True))
    files[5].write_text(json.dumps(summary_json(result), indent=2, allow_nan=False))
    files[6].write_text(report_markdown(result))
    if plots and not result.groups.empty:
        files += plot_all(result, out_dir)
    files += [path for feature in result.features for path in feature.files]
    return files


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts (NaN -> null, numpy -> Python)."""
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []


def summary_json(result: CompareResult) -> dict[str, Any]:
    return {"experiments": result.experiments, "filter": result.filter_string, "group_by": result.group_by,
            "n_runs": len(result.runs), "groups": records(result.groups),
            "metric": result.metric.key, "equal_budget": result.equal_budget,
            "comparisons": records(result.comparisons),
            "pairs": records(result.pairs.drop(columns=["points_a", "points_b"], errors="ignore")),
            "features": [feature.summary() for feature in result.features],
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


def metric_rows(result: CompareResult) -> list[dict[str, str]]:
    """The compared metric per group: n, mean ± std, interval, median, IQM."""
    show = value_format(result, "init")
    rows = []
    for g in result.groups.to_dict("records"):
        ci = ("-" if pd.isna(g["metric_ci_low"])
              else f"[{show(g['metric_ci_low'])}, {show(g['metric_ci_high'])}]")
        spread = "" if pd.isna(g["metric_std"]) else f" ± {show(g['metric_std'])}"
        rows.append({**{name: str(g[name]) for name in result.group_by}, "n": str(int(g["metric_n"])),
                     "mean ± std": show(g["metric_mean"]) + spread, "95% CI": ci,
                     "median": show(g["metric_median"]), "IQM": show(g["metric_iqm"])})
    return rows


def value_format(result: CompareResult, kind: str, signed: bool = False):
    """How a kind's values print: the metric in % (pp for differences) if it is a fraction,
    times in the unit of the time rows, epochs with one decimal."""
    sign = "+" if signed else ""
    if kind == "time":
        unit, size = time_unit(result.comparisons.loc[result.comparisons["kind"] == "time", "a_mean"])
        return lambda v: "-" if pd.isna(v) else f"{v / size:{sign}.1f}"
    if kind == "convergence" or not result.metric.is_fraction:
        digits = 1 if kind == "convergence" else 3
        return lambda v: "-" if pd.isna(v) else f"{v:{sign}.{digits}f}"
    return lambda v: "-" if pd.isna(v) else f"{100 * v:{sign}.1f}"


def value_unit(result: CompareResult, kind: str) -> str:
    if kind == "time":
        return time_unit(result.comparisons.loc[result.comparisons["kind"] == "time", "a_mean"])[0]
    if kind == "convergence":
        return "epochs"
    return "%" if result.metric.is_fraction else ""


def p_text(p: float) -> str:
    return "-" if pd.isna(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def comparison_rows(result: CompareResult, kind: str) -> list[dict[str, str]]:
    show, diff = value_format(result, kind), value_format(result, kind, signed=True)
    unit = value_unit(result, kind)
    diff_unit = "pp" if unit == "%" else unit
    rows = []
    for c in result.comparisons[result.comparisons["kind"] == kind].to_dict("records"):
        ci = (f"[{diff(c['ci_low'])}, {diff(c['ci_high'])}]" if not pd.isna(c["ci_low"])
              else "n too small" if c["n"] < stats.MIN_INTERVAL_N else "no spread" if c["std_diff"] == 0 else "ties")
        win = "-" if pd.isna(c["win_prob"]) else f"{c['win_prob']:.2f} [{c['win_low']:.2f}, {c['win_high']:.2f}]"
        scope = {"backbone": c["backbone"]} if kind not in ("interaction", "backbone") else {}
        if kind in ("strategy", "backbone"):
            scope["init"] = c["init"]
        if kind in ("init", "backbone"):
            scope["strategy"] = c["strategy"]
        rows.append({**scope, "A - B": f"{c['a']} - {c['b']}", "n": str(c["n"]), f"A ({unit})": show(c["a_mean"]),
                     f"B ({unit})": show(c["b_mean"]), f"diff ({diff_unit})": diff(c["mean_diff"]),
                     f"95% CI ({diff_unit})": ci, "P(A>B)": win, "p (Holm)": p_text(c["p_holm"]),
                     "note": c["note"] or "-"})
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
    entries = [(column, notes[base]) for column in rows[0]
               if (base := column if column in notes else column.split(" (")[0]) in notes]
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
    if not result.groups.empty:
        rows = metric_rows(result)
        parts += [heading(f"{result.metric.key} per group"), table(rows, markdown), legend(rows, METRIC_NOTES, markdown)]
        if result.metric.biased_note:
            parts.append(f"Note: {result.metric.biased_note}")
        if result.lacking_metric:
            parts.append(f"Note: {len(result.lacking_metric)} of {len(result.runs)} runs have no "
                         f"{result.metric.key} and are left out of its statistics and pairs (see runs.csv).")
    for kind, title in KIND_TITLES.items():
        rows = comparison_rows(result, kind)
        if rows:
            parts += [heading(title.format(metric=result.metric.key)), table(rows, markdown)]
    if result.comparisons.empty:
        parts.append("No paired comparison: no backbone has both pretrained and scratch runs, and no backbone and "
                     "init has two strategies, with matching dataset, seed and fold.")
    else:
        columns = {column: "" for kind in KIND_TITLES for row in comparison_rows(result, kind)[:1] for column in row}
        parts.append(legend([columns], COMPARISON_NOTES, markdown))
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
        gains = result.comparisons[result.comparisons["kind"] == "init"]
        for row in gains.drop_duplicates("backbone").to_dict("records"):  # each backbone's first row: all strategies
            name = row["backbone"].replace(" ", "_")
            metrics[f"pretrain_gain/{name}"] = row["mean_diff"]
            metrics[f"pretrain_pairs/{name}"] = row["n"]
            metrics[f"pretrain_p_holm/{name}"] = row["p_holm"]
        # Prefixed: under `mlflow run` the entry point's own parameters are already on the run.
        tracker.log_params({"compare.experiments": ",".join(result.experiments.values())[:6000],
                            "compare.filter": result.filter_string or "", "compare.group_by": ",".join(result.group_by),
                            "compare.metric": result.metric.key, "compare.equal_budget": str(result.equal_budget)})
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
            files.append(save(curves_figure(curves, scale, label, styles), out_dir / name))
    if not result.diff_curves.empty:
        files.append(save(difference_figure(result.diff_curves), out_dir / "pretrain_gain_curves.png"))
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


def difference_figure(diffs: pd.DataFrame):
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
    ax.set_ylabel("Pretrained minus scratch val acc (pp)")
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
