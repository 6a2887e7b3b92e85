"""The readable tables of `compare`: the text table printed, groups.md, and the rows of
report.md. Every abbreviated column is defined under its table; a time column has one unit
(s, min or h, in its header)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from mlexp.analysis import stats

if TYPE_CHECKING:
    from mlexp.analysis.result import CompareResult


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
                   "convergence, pair: the arms of --pair, a and b as written): mean_diff = mean of A - B over matched pairs; ci_low/ci_high: 95% studentized "
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
    "n": "matched pairs (same dataset, seed and fold; same strategy or init where those are not compared; same "
         "architecture for --pair unless an arm names it)",
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
    "pair": "Pairs asked for (--pair): arm A minus arm B, {metric}",
}


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
        if result.metric.reason:
            parts.append(f"Compared on {result.metric.key}: {result.metric.reason}.")
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
