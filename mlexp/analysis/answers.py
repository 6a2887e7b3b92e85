"""report.md: the research questions of a pretrained-vs-scratch study, answered in words.

Each answer is one or two sentences built from the rows of `mlexp.analysis.comparisons`: the
difference, its 95% interval, the number of pairs and the Holm-adjusted p-value. An answer
says "not enough evidence" when the interval spans zero, and says what is missing when there
is no interval (too few pairs, no spread) or nothing to compare.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from mlexp.analysis import stats
from mlexp.analysis.tables import p_text

if TYPE_CHECKING:
    from mlexp.analysis.result import CompareResult

ALPHA = 0.05
QUESTIONS = ("Which initialisation works better for this task?", "How much does pretraining help?",
             "Do architectures benefit differently from pretraining?", "What does pretraining change in training time?",
             "Does pretraining converge faster?", "Which fine-tuning strategy wins for each backbone?",
             "How do the learned features differ between pretrained and scratch?")


class Numbers:
    """Formats a comparison row's values in the report's units."""

    def __init__(self, result: CompareResult):
        self.fraction = result.metric.is_fraction
        self.metric = result.metric.key
        self.higher = result.metric.higher_is_better

    def value(self, v: float, kind: str = "metric") -> str:
        if kind == "time":
            return duration(v)
        if kind == "convergence":
            return f"{v:.1f} epochs"
        return f"{100 * v:.1f}%" if self.fraction else f"{v:.3f}"

    def diff(self, v: float, kind: str = "metric") -> str:
        if kind == "time":
            return ("+" if v >= 0 else "-") + duration(abs(v))
        if kind == "convergence":
            return f"{v:+.1f} epochs"
        return f"{100 * v:+.1f} pp" if self.fraction else f"{v:+.3f}"

    def evidence(self, row: dict, kind: str = "metric") -> str:
        """"+2.1 pp, 95% CI [+0.4, +3.9] pp, n = 5 pairs, p (Holm) = 0.031"."""
        if not row["n"]:
            return "no matched pairs"
        diff = self.diff(row["mean_diff"], kind)
        if pd.isna(row["ci_low"]):
            interval = "no interval (" + (f"{row['n']} pair(s); an interval needs at least {stats.MIN_INTERVAL_N}"
                                          if row["n"] < stats.MIN_INTERVAL_N else "every pair differs by the same "
                                          "amount" if row["std_diff"] == 0 else "ties among the pairs") + ")"
        else:
            interval = f"95% CI [{self.diff(row['ci_low'], kind)}, {self.diff(row['ci_high'], kind)}]"
        return f"{diff}, {interval}, n = {row['n']} pairs, p (Holm) = {p_text(row['p_holm'])}"


def duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "-"
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def conclusive(row: dict) -> bool:
    """Enough evidence to name a direction: the interval excludes zero and the adjusted p < 0.05."""
    return (not pd.isna(row["ci_low"]) and (row["ci_low"] > 0 or row["ci_high"] < 0)
            and not pd.isna(row["p_holm"]) and row["p_holm"] < ALPHA)


def why_not(row: dict) -> str:
    """Why a row is not conclusive, in a few words."""
    if pd.isna(row["ci_low"]):
        return "no interval"
    if row["ci_low"] <= 0 <= row["ci_high"]:
        return "the interval spans zero"
    return f"the interval excludes zero, but the adjusted p is {p_text(row['p_holm'])} with {row['n']} pairs"


def verdict(row: dict, better: str, worse: str, higher_is_better: bool = True) -> str:
    """"pretrained is better" / "not enough evidence ..." from the sign, the interval and p."""
    if not row["n"]:
        return "nothing to compare"
    if not conclusive(row):
        return f"not enough evidence of a difference between {better} and {worse} ({why_not(row)})"
    return f"{better} is better" if (row["mean_diff"] > 0) == higher_is_better else f"{worse} is better"


# --- the answers --------------------------------------------------------------------------------------
def which_init(result: CompareResult, say: Numbers) -> list[str]:
    rows = rows_of(result, "init")
    if rows.empty:
        return ["No backbone has both pretrained and scratch runs matched on dataset, strategy, seed and fold: "
                "train both inits (`mlexp sweep --inits pretrained,scratch`) to answer this."]
    overall = rows[rows["backbone"] == "all backbones"]
    chosen = overall if not overall.empty else rows.drop_duplicates("backbone")
    answers = []
    for row in chosen.to_dict("records"):
        where = "over all backbones" if row["backbone"] == "all backbones" else f"for {row['backbone']}"
        answers.append(f"{capital(verdict(row, 'pretrained', 'scratch', say.higher))} {where} on {say.metric}: "
                       f"pretrained minus scratch {say.evidence(row)}.")
    return answers


def how_much(result: CompareResult, say: Numbers) -> list[str]:
    rows = rows_of(result, "init")
    answers = []
    for row in rows[(rows["backbone"] != "all backbones") & (rows["n"] > 0)].to_dict("records"):
        scope = row["backbone"] + ("" if row["strategy"] in ("all", "-") else f" ({row['strategy']})")
        text = (f"{scope}: pretrained {say.value(row['a_mean'])} against scratch {say.value(row['b_mean'])}, "
                f"{say.evidence(row)}")
        if say.fraction and result.metric.higher_is_better and row["b_mean"] < 1:
            reduction = row["mean_diff"] / (1 - row["b_mean"])
            text += (f"; pretraining removes {100 * reduction:.0f}% of scratch's errors (relative error reduction)"
                     if reduction >= 0 else f"; pretraining adds {100 * -reduction:.0f}% to scratch's errors "
                     "(relative error increase)")
        if "unequal budget" in (row["note"] or ""):
            text += "; " + next(part for part in row["note"].split("; ") if part.startswith("unequal budget"))
        if not conclusive(row):
            text += f"; not enough evidence that it changes accuracy ({why_not(row)})"
        answers.append(text + ".")
    return answers or ["Nothing to measure: no matched pretrained/scratch pairs."]


def interaction(result: CompareResult, say: Numbers) -> list[str]:
    rows = rows_of(result, "interaction")
    if rows.empty:
        paired = set(rows_of(result, "init")["backbone"]) - {"all backbones"}
        return [f"Needs paired pretrained and scratch runs of at least two backbones; {len(paired)} backbone(s) "
                "have them."]
    answers = []
    for row in rows.to_dict("records"):
        if conclusive(row):
            # a larger gain in the metric's good direction (up for accuracy, down for a loss)
            bigger, smaller = (row["a"], row["b"]) if (row["mean_diff"] > 0) == say.higher else (row["b"], row["a"])
            lead = f"Yes: pretraining helps {bigger} more than {smaller}"
        else:
            lead = f"Not enough evidence that pretraining helps {row['a']} and {row['b']} differently ({why_not(row)})"
        answers.append(f"{lead} (gain of {row['a']} minus gain of {row['b']}: {say.evidence(row)}).")
    return answers


def training_time(result: CompareResult, say: Numbers) -> list[str]:
    rows = rows_of(result, "time")
    answers = []
    for row in rows.to_dict("records"):
        if not row["n"]:
            continue
        direction = (("longer" if row["mean_diff"] > 0 else "shorter") if conclusive(row)
                     else f"not enough evidence of a difference, {why_not(row)}")
        answers.append(f"{row['backbone']}: pretrained runs took {say.value(row['a_mean'], 'time')} against scratch's "
                       f"{say.value(row['b_mean'], 'time')} ({direction}; {say.evidence(row, 'time')})"
                       + (f"; {row['note']}" if "unequal" in (row["note"] or "") else "") + ".")
    return answers or ["No matched pretrained/scratch pairs with training times."]


def convergence(result: CompareResult, say: Numbers) -> list[str]:
    answers = []
    for row in rows_of(result, "convergence").to_dict("records"):
        level = f"{100 * row['level']:.1f}% val acc" if pd.notna(row["level"]) else "the level"
        if not row["n"]:
            answers.append(f"{row['backbone']}: no pair where both runs reached {level}.")
            continue
        faster = ("pretrained converges faster" if row["mean_diff"] < 0 else "scratch converges faster") \
            if conclusive(row) else f"not enough evidence that either converges faster ({why_not(row)})"
        answers.append(f"{row['backbone']}: to reach {level} (95% of the weaker init's mean best), pretrained needed "
                       f"{say.value(row['a_mean'], 'convergence')} and scratch {say.value(row['b_mean'], 'convergence')}"
                       f"; {faster} ({say.evidence(row, 'convergence')}).")
    return answers or ["No matched pretrained/scratch pairs with val/acc curves."]


def strategy_winner(result: CompareResult, say: Numbers) -> list[str]:
    runs = result.runs
    if runs.empty:
        return ["No finished runs."]
    answers = []
    rows = rows_of(result, "strategy")
    for (arch, init), mine in runs.groupby(["_arch", "_init"], sort=True):
        means = mine.groupby("_strategy")["value"].mean().dropna().sort_values(
            ascending=not result.metric.higher_is_better)
        if len(means) < 2:
            answers.append(f"{arch} ({init}): only {', '.join(means.index) or 'no'} strategy trained; train others "
                           "(`--strategies full,linear,gradual`) to answer this.")
            continue
        best, second = means.index[0], means.index[1]
        row = rows[(rows["backbone"] == arch) & (rows["init"] == init) & (rows["a"].isin([best, second]))
                   & (rows["b"].isin([best, second]))]
        if row.empty:
            answers.append(f"{arch} ({init}): {best} has the best mean ({say.value(means.iloc[0])}), but no pairs "
                           f"match it with {second} on seed and fold.")
            continue
        record = row.iloc[0].to_dict()
        if record["a"] != best:  # state it as best minus runner-up
            record = flip(record)
        if conclusive(record) and (record["mean_diff"] > 0) != result.metric.higher_is_better:
            record, best, second = flip(record), second, best  # paired on seeds, the runner-up wins
            means = means[[best, second]]
        claim = (f"{best} wins" if conclusive(record) else
                 f"{best} has the best mean, but not enough evidence it beats {second} ({why_not(record)})")
        answers.append(f"{arch} ({init}): {claim}: {say.value(means.iloc[0])} against {second}'s "
                       f"{say.value(means.iloc[1])}, {say.evidence(record)}.")
    return answers


def asked_pairs(result: CompareResult, say: Numbers) -> list[str]:
    """--pair: one sentence per row, e.g. "Frozen pretrained (linear probe) vs scratch (full
    training) on resnet18: +4.0 pp, 95% CI [...], n = 5 pairs, p (Holm) = 0.062 (verdict)"."""
    rows = rows_of(result, "pair")
    answers = []
    for pair in result.arm_pairs:
        mine = rows[(rows["a"] == pair.a.spec) & (rows["b"] == pair.b.spec)]
        for row in mine.to_dict("records"):
            scope = ("" if row["backbone"] == "-" else " over all backbones" if row["backbone"] == "all backbones"
                     else f" on {row['backbone']}")
            said = [say.evidence(row), verdict(row, pair.a.describe(), pair.b.describe(), say.higher)] if row["n"] \
                else []  # no pairs: the note says why
            said += [row["note"]] if row["note"] else []
            answers.append(f"{capital(pair.describe())}{scope}: {'; '.join(said)} (`--pair '{pair.label}'`, "
                           f"{say.metric}).")
    return answers


def features(result: CompareResult) -> list[str]:
    if not result.features:
        return ["Not computed: run `mlexp compare --features` to compare the representations (linear CKA) of the "
                "paired pretrained and scratch models."]
    return [feature.sentence() for feature in result.features]


# --- assembling -----------------------------------------------------------------------------------------
def rows_of(result: CompareResult, kind: str) -> pd.DataFrame:
    return result.comparisons[result.comparisons["kind"] == kind]


def flip(row: dict) -> dict:
    """The same comparison stated the other way round (B - A)."""
    flipped = {**row, "a": row["b"], "b": row["a"], "a_mean": row["b_mean"], "b_mean": row["a_mean"],
               "mean_diff": -row["mean_diff"], "ci_low": -row["ci_high"], "ci_high": -row["ci_low"]}
    if not math.isnan(row["win_prob"]):
        flipped.update(win_prob=1 - row["win_prob"], win_low=1 - row["win_high"], win_high=1 - row["win_low"])
    return flipped


def capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def report_markdown(result: CompareResult) -> str:
    say = Numbers(result)
    answers = (which_init(result, say), how_much(result, say), interaction(result, say), training_time(result, say),
               convergence(result, say), strategy_winner(result, say), features(result))
    names = ", ".join(result.experiments.values())
    lines = [f"# What the runs of {names} say", "",
             f"Compared metric: **{result.metric.key}** over {len(result.runs)} finished runs"
             + (" (each pair at the epoch its shorter run stopped: --equal-budget)" if result.equal_budget else "")
             + ". Pairs share dataset, seed and fold. Intervals are 95% studentized bootstrap intervals; p-values "
             "are sign-flip permutation tests, Holm-adjusted over every comparison of this report.", ""]
    if result.metric.reason:
        lines += [f"Compared on {result.metric.key}: {result.metric.reason}.", ""]
    if result.metric.biased_note:
        lines += [f"> {result.metric.biased_note}", ""]
    if result.arm_pairs:  # asked for by name: first
        lines += ["## The pairs asked for (--pair)", "", *(f"- {sentence}" for sentence in asked_pairs(result, say)),
                  ""]
    for number, (question, said) in enumerate(zip(QUESTIONS, answers), start=1):
        lines += [f"## {number}. {question}", "", *(f"- {sentence}" for sentence in said), ""]
    repeats = [row for row in result.excluded if row["status"] == "DUPLICATE"]
    if repeats:  # what n does not count, and why: a reader checks the evidence, not only the verdicts
        lines += ["## Runs counted once", "",
                  *(f"- {row['run_name']} ({row['run_id']}): {row['reason']}" for row in repeats), ""]
    return "\n".join(lines)
