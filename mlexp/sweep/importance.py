"""How much each hyperparameter mattered to an arm of a tuning study, and how sure that is."""

from __future__ import annotations

import numpy as np
import optuna

IMPORTANCE_RESAMPLES = 20


def importances(done: list, names: list[str], seed: int,
                higher_is_better: bool) -> dict[str, tuple[float, float, float]]:
    """Each hyperparameter's importance to the arm's best metric (Optuna's fANOVA), with a 90%
    interval from resampling the arm's finished trials: few trials say little, and this says how
    little. Empty below three finished trials or with one hyperparameter."""
    if len(done) < 3 or len(names) < 2:
        return {}
    rng = np.random.default_rng(seed)
    direction = "maximize" if higher_is_better else "minimize"
    draws: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(IMPORTANCE_RESAMPLES):
        sample = [done[i] for i in rng.integers(0, len(done), len(done))]
        study = optuna.create_study(direction=direction)
        study.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value)
                          for t in sample])
        try:
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
        except (RuntimeError, ValueError):  # a resample whose trials all share a value: nothing to split
            continue
        for name in draws:
            draws[name].append(float(found.get(name, 0.0)))
    return {name: (float(np.mean(v)), float(np.quantile(v, 0.05)), float(np.quantile(v, 0.95)))
            for name, v in draws.items() if v}
