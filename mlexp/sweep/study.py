"""`mlexp tune`: a tuning study that gives every arm the same search, then retrains each arm's
best over paired seeds.

An *arm* is one backbone x init x strategy. Each arm gets its own Optuna study (one sampler,
seeded, so the same command proposes the same trials) over the same search space, with the
same number of trials and the same epochs per trial; the scratch multipliers are off (1.0), so
the tuned learning rate, not a hand-set factor, is what scratch training gets. Optuna's pruner
reads each trial's validation metric after every epoch and may stop a hopeless trial there: the
run then ends FINISHED with the tag `mlexp.trial_state=PRUNED`, its curve kept.

Every trial is an mlexp run under the study's parent run (tags `mlexp.study_stage=trial`,
`mlexp.arm`, `mlexp.trial_number`), trained under a claim on the parent (mlexp.tracking.claims):
two launchers of one study never train a trial twice, and a trial whose launcher was killed is
resumed in its own run from its checkpoint by the next launcher. The studies live in Optuna's
journal file (`mlexp-output/tune/STUDY.journal`: one machine) or in the database `--storage`
names (a team's PostgreSQL), so the same command continues a study where it stopped.

Then the *final stage*: each arm's best trial on validation is retrained with every seed of
`--final-seeds` (tag `mlexp.study_stage=final`), and `compare` pairs those runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlexp import tracking
from mlexp.config import BOOKKEEPING, TrainConfig
from mlexp.errors import MlexpError
from mlexp.option_values import best_is_max, best_key
from mlexp.sweep.space import Dimension
from mlexp.tracking import claims, server
from mlexp.training.run import PRUNED_TAG, run_training

SAMPLERS = ("tpe", "random", "qmc", "grid")
PRUNERS = ("median", "asha", "hyperband", "none")
STUDY_TAG = "mlexp.study"
WAIT_S = 5.0  # how often a launcher looks again at trials another launcher trains
EQUAL_BUDGET = {"scratch_lr_mult": 1.0, "scratch_epochs_mult": 1.0, "scratch_warmup_mult": 1.0, "scratch_wd_mult": 1.0}


@dataclass(frozen=True)
class Arm:
    backbone: str
    init: str
    strategy: str

    @property
    def label(self) -> str:
        return f"{self.backbone}_{self.init}-{self.strategy}"


@dataclass
class StudyPlan:
    base: TrainConfig                       # the training options every trial shares
    arms: list[Arm]
    space: list[Dimension]
    sampler: str = "tpe"
    seed: int = 0
    trials: int = 10                        # per arm
    pruner: str = "median"
    final_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    storage: str | None = None              # an Optuna RDB URL; None: a journal file under mlexp-output/tune/
    out_dir: Path = Path("mlexp-output/tune")

    @property
    def name(self) -> str:
        """The study's name: the same command (arms, space, search, budget, data) is the same study."""
        shared = {k: v for k, v in self.base.to_dict().items() if k not in (*BOOKKEEPING, "workers")}
        what = {"arms": [arm.label for arm in self.arms], "space": [d.describe() for d in self.space],
                "sampler": self.sampler, "seed": self.seed, "trials": self.trials, "pruner": self.pruner,
                "base": shared}
        return "study-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def metric(self) -> str:
        """The epoch metric trials are judged and chosen by: --best-metric, a detector's val/map
        where that is left at its default (as its runs choose their best epoch)."""
        if self.base.task == "detection" and self.base.best_metric == "val/acc":
            return "val/map"
        return self.base.best_metric

    @property
    def higher_is_better(self) -> bool:
        return best_is_max(self.metric, self.base.best_mode)

    def trial_config(self, arm: Arm, params: dict, seed: int | None = None) -> TrainConfig:
        return self.base.replace(backbone=arm.backbone, init=arm.init, strategy=arm.strategy,
                                 **EQUAL_BUDGET, **params, **({"seed": seed} if seed is not None else {}))

    def worst_case_epochs(self) -> int:
        return len(self.arms) * (self.trials + len(self.final_seeds)) * self.base.epochs


@dataclass
class StudyResult:
    parent_run_id: str
    trials: dict[str, list[dict]] = field(default_factory=dict)   # arm -> each trial's number, state, value, params
    best: dict[str, dict] = field(default_factory=dict)           # arm -> the chosen trial
    finals: dict[str, list[str]] = field(default_factory=dict)    # arm -> its final runs
    importance: dict[str, dict] = field(default_factory=dict)     # arm -> param -> (mean, low, high)


# --- Optuna -------------------------------------------------------------------------------------
def optuna_storage(plan: StudyPlan):
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if plan.storage:
        return RDBStorage(plan.storage)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    # An absolute path (Optuna's lock resolves a relative one from its own folder), and a lock
    # that a killed launcher cannot hold for long: one untouched for 10 s is taken over.
    journal = str((plan.out_dir / f"{plan.name}.journal").resolve())
    return JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal, grace_period=10)))


def sampler_for(plan: StudyPlan, arm_index: int, trials_so_far: int = 0):
    import optuna

    # Each arm its own stream, the same for the same command. A sampler's generator does not
    # survive its process: one that continues a study is seeded on from the trials it already
    # has, or it would propose the study's first trials again.
    seed = plan.seed + 1000 * arm_index + trials_so_far
    if plan.sampler == "grid":
        return optuna.samplers.GridSampler({d.name: d.grid_values() for d in plan.space}, seed=seed)
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, scramble=True)}[plan.sampler]()


def pruner_for(plan: StudyPlan):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=plan.base.epochs),
            "none": lambda: optuna.pruners.NopPruner()}[plan.pruner]()


def arm_study(plan: StudyPlan, storage, index: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # mlexp says what happens, once
    name = f"{plan.name}/{plan.arms[index].label}"
    direction = "maximize" if plan.higher_is_better else "minimize"
    study = optuna.create_study(study_name=name, storage=storage, pruner=pruner_for(plan), load_if_exists=True,
                                direction=direction)
    if "metric" not in study.user_attrs:
        study.set_user_attr("metric", plan.metric)
    study.sampler = sampler_for(plan, index, len(study.get_trials(deepcopy=False)))
    return study


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


# --- the study ----------------------------------------------------------------------------------
@dataclass
class Place:
    """Where the study's runs go: the server, the experiment, the parent run, this launcher."""

    uri: str
    client: object
    experiment_id: str
    parent_run_id: str
    owner: str


def open_study_parent(plan: StudyPlan, uri: str) -> Place:
    """The study's parent run, found or created once whatever the number of launchers."""
    client = tracking.client_for(uri)
    experiment_id = server.experiment_id_for(client, plan.base.experiment)
    tags = {STUDY_TAG: plan.name, "mlexp.kind": "study", claims.GRID_TAG: plan.name,
            "mlexp.study_arms": ", ".join(arm.label for arm in plan.arms)[:5000]}

    def candidate() -> str:
        return server.create_run(client, experiment_id, plan.base.run_name or f"tune-{plan.name[6:]}", tags)

    parent, created = claims.sweep_parent(client, experiment_id, plan.name, candidate)
    if created:
        server.log_params(client, parent, {
            "tune.trials_per_arm": str(plan.trials), "tune.epochs_per_trial": str(plan.base.epochs),
            "tune.sampler": plan.sampler, "tune.seed": str(plan.seed), "tune.pruner": plan.pruner,
            "tune.space": "; ".join(d.describe() for d in plan.space)[:6000],
            "tune.final_seeds": ",".join(map(str, plan.final_seeds)), "tune.metric": plan.metric})
    return Place(uri, client, experiment_id, parent, claims.new_owner())


def counted(study) -> list:
    """The arm's trials that count toward its budget (a surplus ask of a racing launcher does not)."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def tune_arm(plan: StudyPlan, place: Place, storage, index: int) -> None:
    """Train the arm's trials until it has its budget: resume a killed launcher's, ask for new
    ones, and wait for those another launcher is training."""
    import optuna
    from optuna.trial import TrialState

    study, arm = arm_study(plan, storage, index), plan.arms[index]
    distributions = {d.name: d.distribution() for d in plan.space}
    said_waiting: set[int] = set()
    while True:
        held = [frozen for frozen in counted(study) if frozen.state == TrialState.RUNNING
                and not settle_ended(place, study, frozen)
                and not train_trial(plan, place, study, optuna.Trial(study, frozen._trial_id), arm)]
        if len(counted(study)) < plan.trials:
            trial = study.ask(distributions)
            if sum(t.number < trial.number for t in counted(study)) >= plan.trials:  # a racing launcher got there
                trial.set_user_attr("surplus", True)
                tell(study, trial, state=TrialState.FAIL)
            else:
                train_trial(plan, place, study, trial, arm)
            continue
        if not held:
            return
        for frozen in held:
            if frozen.number not in said_waiting:
                print(f"mlexp: {arm.label}: waiting for trial {frozen.number}, which another launcher trains",
                      flush=True)
                said_waiting.add(frozen.number)
        time.sleep(WAIT_S)


def tell(study, trial, value: float | None = None, state=None) -> None:
    """Optuna's tell (a finished grid's sampler calls study.stop(), which outside optimize() raises: harmless)."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as error:
        if "stop" not in str(error):
            raise
    except ValueError:  # "Cannot tell a COMPLETE trial": two launchers saw its run end; the first word stands
        number = trial if isinstance(trial, int) else trial.number
        if not any(t.number == number and t.state.is_finished() for t in study.get_trials(deepcopy=False)):
            raise


def settle_ended(place: Place, study, frozen) -> bool:
    """A trial Optuna has RUNNING whose run ended (its launcher died, or is about to tell): told so. True if it was."""
    from optuna.trial import TrialState

    run_id = frozen.user_attrs.get("run_id")
    if not run_id:
        return False
    run = place.client.get_run(run_id)
    if run.info.status == "FINISHED":
        if PRUNED_TAG in run.data.tags:  # set by the training before the run ended
            tell(study, frozen.number, state=TrialState.PRUNED)
        else:
            value = run.data.metrics.get(best_key(study.user_attrs.get("metric", "val/acc")))
            tell(study, frozen.number, value, state=None if value is not None else TrialState.FAIL)
        return True
    if run.info.status == "FAILED":
        tell(study, frozen.number, state=TrialState.FAIL)
        return True
    return False


def train_trial(plan: StudyPlan, place: Place, study, trial, arm: Arm) -> bool:
    """One trial as an mlexp run under the parent, claimed first (False: another launcher
    holds it); its end told to Optuna. A trial whose run started before is resumed in it."""
    from optuna.trial import TrialState

    config_hash = f"trial-{arm.label}-{trial.number}"
    if claims.claim(place.client, place.experiment_id, place.parent_run_id, config_hash, place.owner) is None:
        return False
    name = f"{arm.label}-trial{trial.number}"
    tags = {STUDY_TAG: plan.name, "mlexp.study_stage": "trial", "mlexp.arm": arm.label,
            "mlexp.trial_number": str(trial.number)}
    run_id, _ = claims.child_run(place.client, place.experiment_id, place.parent_run_id, config_hash, name, tags)
    trial.set_user_attr("run_id", run_id)
    print(f"mlexp: {arm.label} trial {trial.number + 1}/{plan.trials}: "
          + ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                      for key, value in trial.params.items()), flush=True)
    judge = Judge(trial, plan.metric)
    cfg = plan.trial_config(arm, trial.params).replace(run_name=name)
    try:  # the claim's key stays the run's config hash: the claims find the run by it
        result = run_training(cfg, run_id=run_id, extra_tags={**tags, "mlexp.config_hash": config_hash}, judge=judge)
    except BaseException:  # the run says how it ended; Optuna must not wait on it
        server.set_tags(place.client, run_id, {"mlexp.trial_state": "FAIL"})
        tell(study, trial, state=TrialState.FAIL)
        raise
    state = TrialState.PRUNED if judge.pruned else TrialState.COMPLETE
    server.set_tags(place.client, run_id, {"mlexp.trial_state": state.name})
    if state == TrialState.PRUNED:
        tell(study, trial, state=state)
    else:
        tell(study, trial, result.history.best_value)
    return True


def final_stage(plan: StudyPlan, place: Place, storage, result: StudyResult) -> None:
    """Each arm's best trial (validation only) retrained with every final seed, once."""
    from optuna.trial import TrialState

    for index, arm in enumerate(plan.arms):
        trials = counted(arm_study(plan, storage, index))
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        result.trials[arm.label] = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                                    for t in trials]
        if not done:
            raise MlexpError(f"{arm.label}: no trial ran to the end (all pruned or failed); widen --space or "
                             "use --pruner none")
        best = (max if plan.higher_is_better else min)(done, key=lambda t: t.value)
        result.best[arm.label] = {"number": best.number, "value": best.value, "params": best.params}
        result.importance[arm.label] = importances(done, plan)
        for seed in plan.final_seeds:
            config_hash = f"final-{arm.label}-s{seed}"
            if not claim_or_wait(place, config_hash, f"{arm.label}'s final run with seed {seed}"):
                continue  # another launcher trained it
            tags = {STUDY_TAG: plan.name, "mlexp.study_stage": "final", "mlexp.arm": arm.label,
                    "mlexp.tuned_from_trial": str(best.number)}
            name = f"{arm.label}-final-s{seed}"
            run_id, _ = claims.child_run(place.client, place.experiment_id, place.parent_run_id, config_hash, name,
                                         tags)
            print(f"mlexp: {arm.label} final seed {seed} with trial {best.number}'s values", flush=True)
            run_training(plan.trial_config(arm, best.params, seed=seed).replace(run_name=name), run_id=run_id,
                         extra_tags={**tags, "mlexp.config_hash": config_hash})
            result.finals.setdefault(arm.label, []).append(run_id)


IMPORTANCE_RESAMPLES = 20


def importances(done: list, plan: StudyPlan) -> dict[str, tuple[float, float, float]]:
    """Each hyperparameter's importance to the arm's best metric (Optuna's fANOVA), with a 90%
    interval from resampling the arm's finished trials: few trials say little, and this says how
    little. Empty below three finished trials or with one hyperparameter."""
    import numpy as np
    import optuna

    if len(done) < 3 or len(plan.space) < 2:
        return {}
    rng = np.random.default_rng(plan.seed)
    direction = "maximize" if plan.higher_is_better else "minimize"
    draws: dict[str, list[float]] = {d.name: [] for d in plan.space}
    for _ in range(IMPORTANCE_RESAMPLES):
        sample = [done[i] for i in rng.integers(0, len(done), len(done))]
        study = optuna.create_study(direction=direction)
        study.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value)
                          for t in sample])
        try:
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=plan.seed))
        except (RuntimeError, ValueError):  # a resample whose trials all share a value: nothing to split
            continue
        for name in draws:
            draws[name].append(float(found.get(name, 0.0)))
    return {name: (float(np.mean(v)), float(np.quantile(v, 0.05)), float(np.quantile(v, 0.95)))
            for name, v in draws.items() if v}


def claim_or_wait(place: Place, config_hash: str, what: str) -> bool:
    """True once this launcher holds the claim; False when the run ended elsewhere (FINISHED or
    FAILED); in between, another launcher trains it: wait for it."""
    said = False
    while claims.claim(place.client, place.experiment_id, place.parent_run_id, config_hash, place.owner) is None:
        status = claims.read_state(place.client, place.experiment_id, place.parent_run_id).status(config_hash)
        if status in ("FINISHED", "FAILED"):
            return False
        if not said:
            print(f"mlexp: waiting for {what}, which another launcher trains", flush=True)
            said = True
        time.sleep(WAIT_S)
    return True


def run_study(plan: StudyPlan, uri: str) -> StudyResult:
    place = open_study_parent(plan, uri)
    storage = optuna_storage(plan)
    print(f"mlexp: study {plan.name} (parent run {place.parent_run_id}): {len(plan.arms)} arm(s) x {plan.trials} "
          f"trial(s) x {plan.base.epochs} epoch(s), {plan.sampler} sampler (seed {plan.seed}), {plan.pruner} pruner",
          flush=True)
    for index in range(len(plan.arms)):
        tune_arm(plan, place, storage, index)
    result = StudyResult(place.parent_run_id)
    final_stage(plan, place, storage, result)
    server.set_tags(place.client, place.parent_run_id, {"mlexp.study_state": "FINISHED"})
    server.set_status(place.client, place.parent_run_id, "FINISHED", None)
    return result
