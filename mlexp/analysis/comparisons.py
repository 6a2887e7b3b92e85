"""Every paired comparison `compare` makes, as rows of one table.

Runs are matched on what the design holds fixed (dataset, seed and fold; strategy or init
where those are not what is compared), so seed-to-seed noise cancels out of each difference.
Kinds of comparison (column `kind`):

- `init`: pretrained minus scratch, per backbone (all strategies, and each strategy when
  there are several), and over all backbones when there are several;
- `strategy`: one fine-tuning strategy minus another, per backbone and init;
- `backbone` (only when asked: `--between-backbones`): one architecture minus another, per
  init and strategy;
- `interaction`: backbone A's pretraining gain minus backbone B's, matched pair by pair;
- `time`: pretrained minus scratch total training time (s), per backbone;
- `convergence`: pretrained minus scratch epochs to reach a common level of validation
  accuracy, per backbone;
- `pair` (only when asked: `--pair 'A vs B'`, `mlexp.analysis.arms`): arm A minus arm B, any two
  sets of runs, matched on dataset, seed, fold and architecture (over all architectures, and per
  architecture when there are several).

Every row has the statistics of `mlexp.analysis.stats.paired`; `p_holm` is the p-value adjusted with
Holm's method over every row of the report, and it is what the tables and report.md show.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlexp.analysis import stats
from mlexp.analysis.arms import ArmPair
from mlexp.analysis.scores import ACCURACY, Score
from mlexp.errors import MlexpError
from mlexp.option_values import best_is_max, best_key

MATCH = ["_dataset", "seed", "fold"]        # what every pair shares
CONVERGENCE_FRACTION = 0.95                 # the level: 95% of the weaker init's mean best val acc
UNITS = {"time": lambda seconds: f"{seconds:.1f} s", "convergence": lambda epochs: f"{epochs:.1f} epochs"}
VALUE_COLUMNS = ["kind", "backbone", "init", "strategy", "a", "b", "n", "a_mean", "b_mean", "mean_diff", "std_diff",
                 "ci_low", "ci_high", "p_value", "p_holm", "p_exact", "win_prob", "win_low", "win_high",
                 "detectable", "a_epochs", "b_epochs", "level", "note"]


@dataclass(frozen=True)
class Metric:
    """What is compared: a metric key of the runs (fractions are shown in percentage points).
    `higher`: its direction when the runs said it (--best-mode), else None: by its name;
    `reason`: why compare chose it, when that is not the plain default."""

    key: str
    higher: bool | None = None
    reason: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.higher if self.higher is not None else best_is_max(self.key, "auto")

    @property
    def is_fraction(self) -> bool:
        return any(word in self.key for word in ("acc", "f1", "top5", "precision", "recall", "map"))

    def format_diff(self, value: float) -> str:
        return f"{100 * value:.1f} pp" if self.is_fraction else f"{value:.3g}"

    @property
    def biased_note(self) -> str | None:
        if self.key.startswith("best/val"):
            return (f"{self.key} is optimistically biased: the same validation split chose the best epoch. "
                    f"Runs with a test split (--test-split) are compared on "
                    f"{'test/map' if self.key.startswith('best/val_map') else 'test/acc'} instead.")
        return None


def choose_metric(requested: str | None, available: set[str], everywhere: set[str], equal_budget: bool,
                  own_best: set[tuple[str, bool]] | None = None, score: Score = ACCURACY) -> Metric:
    """--metric, else the score's test value (test/acc, a detector's test/map) when every run has
    a test split, else the runs' own best metric. `available`: metric keys some run has;
    `everywhere`: keys every run has; `own_best`: each run's (--best-metric, whether higher is
    better), ("val/acc", True) for runs from before it."""

    curve_metrics = (score.best, score.curve)  # what --equal-budget can read at an earlier epoch
    if requested:
        if requested != score.best and requested not in available:
            keys = sorted(key for key in available if not key.startswith(("train/batch", "sys/")))
            raise MlexpError(f"--metric {requested!r} is not a metric of the compared runs; "
                             f"they have: {', '.join(keys[:30]) or 'none'}")
        if equal_budget and requested not in curve_metrics:
            raise MlexpError(f"--equal-budget reads the {score.curve} curves at an earlier epoch; {requested!r} has "
                             f"no such curve: compare {' or '.join(curve_metrics)} with it, or drop --equal-budget")
        return Metric(requested)
    if score.test in everywhere and not equal_budget:
        return Metric(score.test)
    return own_best_metric(own_best or set(), equal_budget, available, score)


def own_best_metric(own_best: set[tuple[str, bool]], equal_budget: bool, available: set[str],
                    score: Score = ACCURACY) -> Metric:
    """best/<the runs' --best-metric>, in its direction, when every run chose its best epoch by the
    same metric. Runs that chose by different ones fall back to the score's best (best/val_acc:
    every compared run has its curve) with a line saying so, rather than refuse: a report still
    comes out, every pair is measured on one thing, and --metric picks another."""
    fallback = score.best
    if len(own_best) > 1:
        chosen = ", ".join(f"{metric} ({'max' if higher else 'min'})" for metric, higher in sorted(own_best))
        return Metric(fallback, reason=f"the runs chose their best epochs by different metrics ({chosen}): compared "
                                       f"on {fallback}; --metric KEY compares another")
    metric, higher = next(iter(own_best), (score.curve, True))
    key = best_key(metric)
    if (key, higher) == (fallback, True):
        return Metric(fallback)
    if equal_budget:
        return Metric(fallback, reason=f"--equal-budget reads the {score.curve} curves: compared on {fallback}, "
                                       f"not the runs' own {key}")
    if key not in available:  # chosen by it, but not logged as best/* (runs from before training logged it)
        return Metric(fallback, reason=f"the runs chose their best epochs by {metric}, but none logged {key}: "
                                       f"compared on {fallback}")
    return Metric(key, higher, reason=f"the runs' own best metric (--best-metric {metric}, best "
                                      f"{'high' if higher else 'low'})")


# --- matching ------------------------------------------------------------------------------------
def pair_up(frame: pd.DataFrame, column: str, a: str, b: str, keys: list[str], value: str = "value") -> pd.DataFrame:
    """Runs with `column` == a next to runs with `column` == b that share `keys` (one row per
    match, sorted by keys; several runs with the same keys, which differ in some other param,
    are averaged). Plain dictionaries: compare makes many of these, and a pandas groupby and
    join each would cost more than the statistics."""
    sides = []
    for side in (a, b):
        part = frame[frame[column] == side]
        matched: dict[tuple, list] = {}
        for *key, number, epochs, run_id, points in zip(*(part[k] for k in keys), part[value], part["epochs_run"],
                                                         part["run_id"], part["_val_acc_points"]):
            matched.setdefault(tuple(key), []).append((number, epochs, run_id, points))
        sides.append(matched)
    rows = []
    for key in sorted(sides[0].keys() & sides[1].keys(), key=lambda k: tuple(map(str, k))):
        row = dict(zip(keys, key))
        for suffix, found in zip(("_a", "_b"), (sides[0][key], sides[1][key])):
            row.update({f"value{suffix}": finite_mean([f[0] for f in found]),
                        f"epochs{suffix}": finite_mean([f[1] for f in found]),
                        f"run_id{suffix}": found[0][2], f"points{suffix}": found[0][3]})
        rows.append(row)
    columns = [*keys, *(f"{name}{suffix}" for suffix in ("_a", "_b") for name in ("value", "epochs", "run_id", "points"))]
    return pd.DataFrame(rows, columns=columns)


def finite_mean(values: list[float]) -> float:
    """The mean of the finite values (NaN if none), as a pandas groupby mean skips NaN."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.nan


def at_epoch(points: list[tuple[int, float]], epoch: float, best_so_far: bool) -> float:
    """From a val/acc curve: the best value up to `epoch` (best_so_far) or the value at it."""
    seen = [value for step, value in points if step <= epoch]
    if not seen:
        return math.nan
    return max(seen) if best_so_far else seen[-1]


def equalise_budget(pairs: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """Both sides of each pair at the epoch the shorter one stopped, read from val/acc curves."""
    epoch = np.minimum(pairs["epochs_a"], pairs["epochs_b"])
    best = metric.key.startswith("best/")  # the best so far; else the value at that epoch
    return pairs.assign(value_a=[at_epoch(p, e, best) for p, e in zip(pairs["points_a"], epoch)],
                        value_b=[at_epoch(p, e, best) for p, e in zip(pairs["points_b"], epoch)])


def budget_note(pairs: pd.DataFrame, a: str, b: str, equal_budget: bool) -> str:
    """Said next to a row whose sides trained for different numbers of epochs."""
    epochs_a, epochs_b = pairs["epochs_a"].mean(), pairs["epochs_b"].mean()
    if pairs.empty or not np.isfinite([epochs_a, epochs_b]).all() or abs(epochs_a - epochs_b) < 1e-9:
        return ""
    said = f"unequal budget: {a} trained {epochs_a:g} epochs against {b}'s {epochs_b:g}"
    if equal_budget:
        return said + f"; compared at epoch {np.minimum(pairs['epochs_a'], pairs['epochs_b']).mean():g} (--equal-budget)"
    return said + "; --equal-budget compares them at the same epoch"


# --- one row ----------------------------------------------------------------------------------------
def comparison_row(kind: str, scope: dict[str, str], a: str, b: str, pairs: pd.DataFrame, note: str = "",
                   level: float = math.nan, unit=lambda value: f"{value:.3g}") -> dict:
    result = stats.paired(pairs["value_a"], pairs["value_b"]) if not pairs.empty else stats.paired([], [])
    if not pairs.empty:  # the side means over the pairs the difference is over
        pairs = pairs[np.isfinite(pairs["value_a"].astype(float)) & np.isfinite(pairs["value_b"].astype(float))]
    notes = [text for text in (note, stats.no_interval_reason(result) if result.n else "no matched pairs")
             if text]
    if 0 < result.n < stats.SMALL_N and math.isfinite(result.detectable):
        notes.append(f"n = {result.n} < {stats.SMALL_N}: smallest difference detectable at 80% power "
                     f"is ±{unit(result.detectable)}")
    elif 0 < result.n < stats.SMALL_N:
        notes.append(f"n = {result.n} < {stats.SMALL_N}: too few pairs to estimate the detectable difference")
    return {"kind": kind, "backbone": scope.get("backbone", "-"), "init": scope.get("init", "-"),
            "strategy": scope.get("strategy", "-"), "a": a, "b": b, "n": result.n,
            "a_mean": float(pairs["value_a"].mean()) if len(pairs) else math.nan,
            "b_mean": float(pairs["value_b"].mean()) if len(pairs) else math.nan,
            "mean_diff": result.mean, "std_diff": result.std, "ci_low": result.ci_low, "ci_high": result.ci_high,
            "p_value": result.p_value, "p_holm": math.nan, "p_exact": result.p_exact, "win_prob": result.win_prob,
            "win_low": result.win_low, "win_high": result.win_high, "detectable": result.detectable,
            "a_epochs": float(pairs["epochs_a"].mean()) if len(pairs) else math.nan,
            "b_epochs": float(pairs["epochs_b"].mean()) if len(pairs) else math.nan,
            "level": level, "note": "; ".join(notes)}


# --- all rows --------------------------------------------------------------------------------------
class RowMaker:
    """Collects the rows of one report: `add` pairs a frame's runs (or takes ready `pairs`),
    equalises their budgets when asked, and appends the comparison's row."""

    def __init__(self, metric: Metric, equal_budget: bool):
        self.metric, self.equal_budget, self.rows = metric, equal_budget, []

    def add(self, kind, scope, frame, column, a, b, keys, value="value", note="", level=math.nan, budget=True,
            pairs=None) -> pd.DataFrame:
        pairs = pair_up(frame, column, a, b, keys, value) if pairs is None else pairs
        if budget and self.equal_budget and value == "value":
            pairs = equalise_budget(pairs, self.metric)
        said = "; ".join(text for text in (note, budget_note(pairs, a, b, self.equal_budget) if budget else "")
                         if text)
        self.rows.append(comparison_row(kind, scope, a, b, pairs, said, level,
                                        UNITS.get(kind, self.metric.format_diff)))
        return pairs


def comparisons(runs: pd.DataFrame, metric: Metric, *, equal_budget: bool = False, between_backbones: bool = False,
                arm_pairs: list[ArmPair] | tuple = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every comparison as a row, Holm-adjusted; the pretrained/scratch pairs behind the init rows).
    `arm_pairs`: the --pair arms, whose sides are in the runs' `_pair<index>` columns."""
    if runs.empty and not arm_pairs:
        return pd.DataFrame(columns=VALUE_COLUMNS), pd.DataFrame()
    made = RowMaker(metric, equal_budget)
    pair_frames = init_rows(made, runs) if not runs.empty else []
    for (arch, init), mine in runs.groupby(["_arch", "_init"], sort=True):
        for first, second in itertools.combinations(sorted(mine["_strategy"].unique()), 2):
            made.add("strategy", {"backbone": arch, "init": init}, mine, "_strategy", first, second, MATCH)
    if between_backbones:
        for (init, strategy), mine in runs.groupby(["_init", "_strategy"], sort=True):
            for first, second in itertools.combinations(sorted(mine["_arch"].unique()), 2):
                made.add("backbone", {"init": init, "strategy": strategy}, mine, "_arch", first, second, MATCH)
    for index, pair in enumerate(arm_pairs):
        arm_rows(made, runs, f"_pair{index}", pair)
    table = pd.DataFrame(made.rows, columns=VALUE_COLUMNS)
    table["p_holm"] = stats.holm(table["p_value"].to_numpy(dtype=float))  # over every row, --pair ones too
    pairs = pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame()
    return table, pairs


def init_rows(made: RowMaker, runs: pd.DataFrame) -> list[pd.DataFrame]:
    """Pretrained minus scratch per backbone (and strategy), its time and convergence, over all
    backbones, and the interactions; returns the pairs behind the per-backbone init rows."""
    init_keys = ["_strategy", *MATCH]
    gains: dict[str, pd.DataFrame] = {}
    pair_frames = []
    for arch in sorted(runs["_arch"].dropna().unique()):
        mine = runs[runs["_arch"] == arch]
        if not set(mine["_init"]) >= {"pretrained", "scratch"}:
            continue
        every = pair_up(mine, "_init", "pretrained", "scratch", init_keys)
        per_strategy = {strategy: pairs.reset_index(drop=True) for strategy, pairs in every.groupby("_strategy")}
        label = "all" if len(per_strategy) > 1 else next(iter(per_strategy), "-")
        pairs = made.add("init", {"backbone": arch, "strategy": label}, None, "_init", "pretrained", "scratch",
                         init_keys, pairs=every)
        pair_frames.append(pairs.assign(backbone=arch))
        gains[arch] = pairs.assign(gain=pairs["value_a"] - pairs["value_b"])
        if len(per_strategy) > 1:  # else the row above is that one strategy's
            for strategy, pairs in per_strategy.items():
                made.add("init", {"backbone": arch, "strategy": strategy}, None, "_init", "pretrained", "scratch",
                         init_keys, pairs=pairs)
        made.add("time", {"backbone": arch}, mine, "_init", "pretrained", "scratch", init_keys,
                 value="total_time_s", budget=False)
        level = CONVERGENCE_FRACTION * min(mine[mine["_init"] == init]["best_val_acc"].mean()
                                           for init in ("pretrained", "scratch"))
        reached = mine.assign(epochs_to_level=[first_epoch_reaching(points, level)
                                               for points in mine["_val_acc_points"]])
        made.add("convergence", {"backbone": arch}, reached, "_init", "pretrained", "scratch", init_keys,
                 value="epochs_to_level", level=level, budget=False, note=never_reached_note(reached, level))
    if len(gains) > 1:
        made.add("init", {"backbone": "all backbones", "strategy": "all"}, runs, "_init", "pretrained", "scratch",
                 ["_arch", *init_keys])
        made.rows += interaction_rows(gains, init_keys, made.metric)
    return pair_frames


def arm_rows(made: RowMaker, runs: pd.DataFrame, column: str, pair: ArmPair) -> None:
    """--pair: arm A minus arm B over the runs matched on dataset, seed, fold and (unless an arm
    names it) the architecture; over all architectures, and per architecture when there are several.
    An arm that matches no run, or runs that match both arms, are said in the row's note."""
    a, b = pair.a.spec, pair.b.spec
    sides = runs[column] if column in runs else pd.Series([None] * len(runs), index=runs.index, dtype=object)
    notes = [f"no run matches {spec}" for spec in (a, b) if not (sides == spec).any()]
    if (sides == "both").any():
        notes.append(f"{int((sides == 'both').sum())} run(s) match both arms: left out")
    frame = runs[sides.isin([a, b])]
    keys = [*MATCH, "_arch"] if pair.match_arch else list(MATCH)
    archs = sorted(pair_up(frame, column, a, b, keys)["_arch"].unique()) if pair.match_arch else []
    overall = "all backbones" if len(archs) > 1 else archs[0] if archs else "-"
    made.add("pair", {"backbone": overall}, frame, column, a, b, keys, note="; ".join(notes))
    for arch in archs if len(archs) > 1 else []:
        made.add("pair", {"backbone": arch}, frame[frame["_arch"] == arch], column, a, b, keys)


def first_epoch_reaching(points: list[tuple[int, float]], level: float) -> float:
    return next((float(step) for step, value in points if value >= level), math.nan)


def never_reached_note(frame: pd.DataFrame, level: float) -> str:
    missing = int(frame["epochs_to_level"].isna().sum())
    return (f"level {100 * level:.1f}% val acc; {missing} run(s) never reached it (left out)" if missing
            else f"level {100 * level:.1f}% val acc")


def interaction_rows(gains: dict[str, pd.DataFrame], keys: list[str], metric: Metric) -> list[dict]:
    """Backbone A's pretraining gain minus backbone B's, matched pair by pair on `keys`."""
    rows = []
    for first, second in itertools.combinations(sorted(gains), 2):
        matched = gains[first][[*keys, "gain"]].merge(gains[second][[*keys, "gain"]], on=keys, suffixes=("_a", "_b"))
        matched = matched.rename(columns={"gain_a": "value_a", "gain_b": "value_b"}).assign(
            epochs_a=math.nan, epochs_b=math.nan)
        rows.append(comparison_row("interaction", {}, first, second, matched, unit=metric.format_diff))
    return rows
