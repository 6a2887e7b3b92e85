"""report.md's tuning section for `mlexp tune`: what each arm was given (trials, epochs), what
it chose, how close its best trials were, and whether the arms' order holds beyond each arm's
single best configuration."""

# Imported where used: `matplotlib` and `optuna` (their plots): only the plots at a study's end
# need them, not the report's tuning section.
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

TOP_K = 3


def tuning_section(plan, result) -> str:
    """Markdown: the budget table, each arm's chosen values, and the top-k check."""
    rows, budgets, order_best, order_top = [], set(), {}, {}
    sign = 1.0 if plan.higher_is_better else -1.0
    for arm in plan.arms:
        trials = result.trials.get(arm.label, [])
        complete = sorted((t["value"] for t in trials if t["state"] == "COMPLETE"), key=lambda v: -sign * v)
        pruned = sum(t["state"] == "PRUNED" for t in trials)
        budgets.add((len(trials), plan.base.epochs))
        best = result.best.get(arm.label, {})
        gap = f"{abs(complete[0] - complete[1]):.4f}" if len(complete) > 1 else "-"
        top = complete[:TOP_K]
        order_best[arm.label] = complete[0] if complete else float("nan")
        order_top[arm.label] = sum(top) / len(top) if top else float("nan")
        chosen = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                           for name, value in best.get("params", {}).items())
        rows.append(f"| {arm.label} | {len(trials)} | {plan.base.epochs} | {len(complete)} | {pruned} | "
                    f"{best.get('value', float('nan')):.4f} | {gap} | {chosen} |")
    equal = len(budgets) == 1
    by_best = sorted(order_best, key=lambda label: -sign * order_best[label])
    by_top = sorted(order_top, key=lambda label: -sign * order_top[label])
    lines = ["## Tuning", "",
             f"Each arm was tuned by its own {plan.sampler} search (seed {plan.seed}) over one space: "
             + "; ".join(dimension.describe() for dimension in plan.space) + f", with the {plan.pruner} pruner on "
             f"{plan.metric}, and no scratch multipliers. Budgets: "
             + ("**equal**, " if equal else "**unequal**, ")
             + f"{plan.trials} trial(s) of {plan.base.epochs} epoch(s) per arm. The best trial of each arm "
             f"(chosen on validation only) was retrained with seeds {', '.join(map(str, plan.final_seeds))}; "
             "the comparisons above are on those runs.", "",
             f"| arm | trials | epochs per trial | ran to the end | pruned | best {plan.metric} | "
             "gap to its 2nd best | chosen values |",
             "|---|---|---|---|---|---|---|---|", *rows, "",
             f"Order of the arms by their best trial: {', '.join(by_best)}; by the mean of their top {TOP_K}: "
             f"{', '.join(by_top)} - "
             + ("the same: the conclusion does not rest on one lucky configuration." if by_best == by_top else
                "it differs: the ranking rests on single configurations; widen the search before trusting it.")]
    lines += ["", "What the search says (Optuna's fANOVA importance over each arm's finished trials, mean and "
              "90% interval over resamples of them; few trials say little):", ""]
    for arm in plan.arms:
        found = result.importance.get(arm.label) or {}
        said = "; ".join(f"{name} {mean:.2f} [{low:.2f}, {high:.2f}]" for name, (mean, low, high) in
                         sorted(found.items(), key=lambda item: -item[1][0]))
        lines.append(f"- {arm.label}: {said or 'too few finished trials (3 needed) or one hyperparameter'}")
    lines += ["", f"Each arm's slice and parallel-coordinate plots (Optuna's) are in `{PLOTS_PATH}/` on the study's "
              f"parent run ({result.parent_run_id})."]
    return "\n".join(lines) + "\n"


PLOTS = ("slice", "parallel_coordinate")
PLOTS_PATH = "study_plots"  # on the study's parent run


def study_plots(studies: dict[str, Any], out_dir: Path) -> list[Path]:
    """Optuna's slice and parallel-coordinate plots of each arm's trials that ran to the end:
    where in the space its good values lie, and which values went together."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for label, study in studies.items():
        for name in PLOTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = getattr(optuna_plots, f"plot_{name}")(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.suptitle(f"{label}: {name.replace('_', ' ')}")
            path = out_dir / f"{label}_{name}.png"
            figure.savefig(path, dpi=90, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
    return written
