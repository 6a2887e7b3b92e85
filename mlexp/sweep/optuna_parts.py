"""Optuna's side of a tuning study (mlexp.sweep.study): where the studies live, each arm's
sampler and pruner, each arm's study, and the judge that reports a trial's epochs to it."""

from __future__ import annotations

import math

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from mlexp.sweep.study_plan import StudyPlan


def optuna_storage(plan: StudyPlan):
    if plan.storage:
        return RDBStorage(plan.storage)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    # An absolute path (Optuna's lock resolves a relative one from its own folder), and a lock
    # that a killed launcher cannot hold for long: one untouched for 10 s is taken over.
    journal = str((plan.out_dir / f"{plan.name}.journal").resolve())
    return JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal, grace_period=10)))


def sampler_for(plan: StudyPlan, arm_index: int, trials_so_far: int = 0):
    # Each arm its own stream, the same for the same command. A sampler's generator does not
    # survive its process: one that continues a study is seeded on from the trials it already
    # has, or it would propose the study's first trials again; and each of --parallel's workers
    # has a stream of its own, or they would all propose the same values at once.
    seed = plan.seed + 1000 * arm_index + trials_so_far + 7919 * plan.worker
    if plan.sampler == "grid":
        return optuna.samplers.GridSampler({d.name: d.grid_values() for d in plan.space}, seed=seed)
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, scramble=True)}[plan.sampler]()


def pruner_for(plan: StudyPlan):
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=plan.base.epochs),
            "none": lambda: optuna.pruners.NopPruner()}[plan.pruner]()


def arm_study(plan: StudyPlan, storage, index: int, place):
    """The arm's Optuna study (`place`: the study's mlexp.sweep.study.Place), named after the study's parent run as well: the same command
    against another tracking store (another parent) searches afresh, never continuing a search
    whose runs are elsewhere. A study begun before the parent was in the name is continued
    where its trials' runs are in this store."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # mlexp says what happens, once
    name = arm_study_name(plan, storage, index, place)
    direction = "maximize" if plan.higher_is_better else "minimize"
    study = optuna.create_study(study_name=name, storage=storage, pruner=pruner_for(plan), load_if_exists=True,
                                direction=direction)
    if "metric" not in study.user_attrs:
        study.set_user_attr("metric", plan.metric)
    study.sampler = sampler_for(plan, index, len(study.get_trials(deepcopy=False)))
    return study


def arm_study_name(plan: StudyPlan, storage, index: int, place) -> str:
    label = plan.arms[index].label
    legacy = f"{plan.name}/{label}"
    return legacy if continues_here(storage, legacy, place) else f"{plan.name}/{place.parent_run_id}/{label}"


def continues_here(storage, name: str, place) -> bool:
    """Whether the Optuna study `name` exists and its trials' runs are in this tracking store."""
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return False
    for run_id in {trial.user_attrs["run_id"] for trial in trials if "run_id" in trial.user_attrs}:
        try:
            return place.client.get_run(run_id).info.run_id == run_id
        except Exception:  # noqa: BLE001 - not in this store (RESOURCE_DOES_NOT_EXIST, or a store without it)
            continue
    return False


class Judge:
    """Reports each epoch's value of the best metric to the trial; stops it when Optuna prunes."""

    def __init__(self, trial, metric: str) -> None:
        self.trial, self.metric, self.pruned = trial, metric, False

    def __call__(self, epoch: int, row: dict) -> bool:
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        self.trial.report(float(value), epoch)
        self.pruned = self.trial.should_prune()
        if self.pruned:
            print(f"mlexp: trial {self.trial.number} pruned after epoch {epoch} ({self.metric} {value:.4f})",
                  flush=True)
        return self.pruned
