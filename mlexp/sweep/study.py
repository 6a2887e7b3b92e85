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

import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from mlexp import tracking
from mlexp.errors import MlexpError
from mlexp.option_values import best_key
from mlexp.sweep.importance import importances
from mlexp.sweep.optuna_parts import Judge, arm_study, optuna_storage
from mlexp.sweep.study_plan import Arm, StudyPlan
from mlexp.tracking import claims, server
from mlexp.training.interrupts import raise_if_stopped, stops_as_interrupt
from mlexp.training.run import PRUNED_TAG, run_training

STUDY_TAG = "mlexp.study"
WAIT_S = 5.0  # how often a launcher looks again at trials another launcher trains


@dataclass
class StudyResult:
    parent_run_id: str
    trials: dict[str, list[dict]] = field(default_factory=dict)   # arm -> each trial's number, state, value, params
    best: dict[str, dict] = field(default_factory=dict)           # arm -> the chosen trial
    finals: dict[str, list[str]] = field(default_factory=dict)    # arm -> its final runs
    importance: dict[str, dict] = field(default_factory=dict)     # arm -> param -> (mean, low, high)
    studies: dict[str, object] = field(default_factory=dict)      # arm -> its Optuna study


# --- the study ----------------------------------------------------------------------------------
@dataclass
class Place:
    """Where the study's runs go: the server, the experiment, the parent run, this launcher."""

    uri: str
    client: object
    experiment_id: str
    parent_run_id: str
    owner: str


def open_study_parent(plan: StudyPlan, uri: str, project_run_id: str | None = None) -> Place:
    """The study's parent run, found or created once whatever the number of launchers; under
    `mlflow run`, the run it created, when the study has no parent yet (else that run is tagged
    with the parent it continues)."""
    client = tracking.client_for(uri)
    experiment_id = server.experiment_id_for(client, plan.base.experiment)
    tags = {STUDY_TAG: plan.name, "mlexp.kind": "study", claims.GRID_TAG: plan.name,
            "mlexp.study_arms": ", ".join(arm.label for arm in plan.arms)[:5000]}

    def candidate() -> str:
        if project_run_id:
            server.set_tags(client, project_run_id, tags)
            return project_run_id
        return server.create_run(client, experiment_id, plan.base.run_name or f"tune-{plan.name[6:]}", tags)

    parent, created = claims.sweep_parent(client, experiment_id, plan.name, candidate, keep=project_run_id)
    if project_run_id and parent != project_run_id:
        server.set_tags(client, project_run_id, {"mlexp.study_parent": parent, STUDY_TAG: plan.name})
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
    study, arm = arm_study(plan, storage, index, place), plan.arms[index]
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
    raise_if_stopped()  # a stop swallowed since the last trial: no new one starts
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
    except KeyboardInterrupt:  # stopped (Ctrl-C, SIGTERM): the run ended KILLED after its last checkpoint; the
        raise                  # trial stays RUNNING, and the next launcher resumes it in its run
    except BaseException:  # failed: the run says how; Optuna must not wait on it
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
    for index, arm in enumerate(plan.arms):
        study = arm_study(plan, storage, index, place)
        result.studies[arm.label] = study
        trials = counted(study)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        result.trials[arm.label] = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                                    for t in trials]
        if not done:
            raise MlexpError(f"{arm.label}: no trial ran to the end (all pruned or failed); widen --space or "
                             "use --pruner none")
        best = (max if plan.higher_is_better else min)(done, key=lambda t: t.value)
        result.best[arm.label] = {"number": best.number, "value": best.value, "params": best.params}
        result.importance[arm.label] = importances(done, [d.name for d in plan.space], plan.seed,
                                                   plan.higher_is_better)
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


def claim_or_wait(place: Place, config_hash: str, what: str) -> bool:
    """True once this launcher holds the claim; False when the run ended elsewhere (FINISHED or
    FAILED); in between, another launcher trains it: wait for it."""
    said = False
    raise_if_stopped()  # a stop swallowed since the last run: no new one starts
    while claims.claim(place.client, place.experiment_id, place.parent_run_id, config_hash, place.owner) is None:
        status = claims.read_state(place.client, place.experiment_id, place.parent_run_id).status(config_hash)
        if status in ("FINISHED", "FAILED"):
            return False
        if not said:
            print(f"mlexp: waiting for {what}, which another launcher trains", flush=True)
            said = True
        time.sleep(WAIT_S)
    return True


def run_study(plan: StudyPlan, uri: str, project_run_id: str | None = None) -> StudyResult:
    """The arms' trials, then their final runs. Ctrl-C or SIGTERM anywhere stops it with
    KeyboardInterrupt (mlexp.training.interrupts): the trial in training ends its run KILLED."""
    with stops_as_interrupt():
        return _run_study(plan, uri, project_run_id)


def _run_study(plan: StudyPlan, uri: str, project_run_id: str | None) -> StudyResult:
    place = open_study_parent(plan, uri, project_run_id)
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
