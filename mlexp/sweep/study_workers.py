"""`mlexp tune --parallel N` and `--executor ray`: one study, N launchers at once.

A study already takes any number of launchers: Optuna's storage hands each its next trial,
and the claims on the study's parent run keep every trial and final run with one launcher
(mlexp.sweep.study). So a wider study is more launchers: N worker processes on this machine,
each with cores // N threads (or its own GPU), or N Ray tasks over a cluster, each starting
its worker on its node (which the kernel kills when the task's Ray worker dies; Ray then runs
the task again, and the new worker resumes the trial in its run from its checkpoint).

A worker is `python -m mlexp study-worker`, reading the study's plan from its stdin as JSON:
no credentials (the tracking URI comes in its environment, as a sweep child's does) and
nothing on a command line. This launcher waits for them, says how far the study is, and stops
them (each ends its run KILLED) when it is stopped itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError, RunFailed
from mlexp.sweep.local_executor import (
    THREAD_VARIABLES,
    ChildOutcome,
    die_with_parent,
    forwarded_env,
    make_local_executor,
    stop_process,
)
from mlexp.sweep.optuna_parts import arm_study_name, optuna_storage
from mlexp.sweep.ray_executor import ChildKilled, RayExecutor
from mlexp.sweep.space import Dimension
from mlexp.sweep.study import Place, counted, run_study
from mlexp.sweep.study_plan import Arm, StudyPlan

POLL_S = 2.0  # how often the launcher looks at its workers and the study's progress


# --- the plan, as a worker reads it --------------------------------------------------------------
def plan_to_json(plan: StudyPlan) -> str:
    """The plan without its tracking URI (a worker takes it from its environment)."""
    return json.dumps({"base": {**plan.base.to_dict(), "tracking_uri": None},
                       "arms": [dataclasses.asdict(arm) for arm in plan.arms],
                       "space": [dataclasses.asdict(dimension) for dimension in plan.space],
                       "sampler": plan.sampler, "seed": plan.seed, "trials": plan.trials, "pruner": plan.pruner,
                       "final_seeds": plan.final_seeds, "storage": plan.storage,
                       "out_dir": str(plan.out_dir.resolve()), "worker": plan.worker})


def plan_from_json(text: str) -> StudyPlan:
    values = json.loads(text)
    space = [Dimension(**{**d, "choices": tuple(d["choices"])}) for d in values["space"]]
    return StudyPlan(TrainConfig.from_dict(values["base"]), [Arm(**arm) for arm in values["arms"]], space,
                     values["sampler"], values["seed"], values["trials"], values["pruner"], values["final_seeds"],
                     values["storage"], Path(values["out_dir"]), values["worker"])


# --- one worker, wherever it runs ----------------------------------------------------------------
@dataclass
class StudyWorker:
    """One launcher of the study, as this launcher hands it to an executor (picklable for Ray)."""

    index: int
    plan_json: str
    tracking_uri: str
    log_path: str
    # the launcher's settings, wherever the worker runs; PG*: a --storage on PostgreSQL (its password
    # in PGPASSWORD or PGPASSFILE, never in the URL)
    env: dict[str, str] = field(default_factory=lambda: forwarded_env("PG"))
    gpus: list[str] = field(default_factory=list)
    cwd: str = field(default_factory=os.getcwd)  # the launcher's: relative paths (--data) mean the same

    @property
    def run_name(self) -> str:  # what the Ray executor calls a job
        return f"study worker {self.index}"


def start_worker(worker: StudyWorker, threads: int, on_parent_death: int) -> subprocess.Popen:
    env = {**os.environ, **worker.env, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": worker.tracking_uri,
           **{name: str(threads) for name in THREAD_VARIABLES}}  # N workers never oversubscribe the cores
    if worker.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(worker.gpus)
    Path(worker.log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(worker.log_path, "ab") as log:
        # Its own session: Ctrl-C reaches the launcher alone, which then stops each worker once.
        process = subprocess.Popen([sys.executable, "-m", "mlexp", "study-worker"], stdin=subprocess.PIPE,
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   cwd=worker.cwd if os.path.isdir(worker.cwd) else None,
                                   preexec_fn=die_with_parent(on_parent_death))
    process.stdin.write(worker.plan_json.encode())
    process.stdin.close()
    return process


def outcome_of(worker: StudyWorker, exit_code: int, seconds: float) -> ChildOutcome:
    status = "FINISHED" if exit_code == 0 else "KILLED" if exit_code in (130, -signal.SIGTERM) else "FAILED"
    return ChildOutcome(worker.index, status, exit_code=exit_code, seconds=seconds)


def ray_study_worker(worker: StudyWorker, threads: int) -> ChildOutcome:
    """A Ray task: the worker process on this node, ended with the task when Ray cancels it."""
    started = time.monotonic()
    process = start_worker(worker, threads, signal.SIGKILL)
    try:
        exit_code = process.wait()
    except BaseException:  # cancelled: the worker ends its trial's run KILLED
        stop_process(process)
        raise
    if exit_code < 0 and exit_code != -signal.SIGTERM:
        raise ChildKilled(f"study worker {worker.index} killed by {signal.Signals(-exit_code).name}")
    return outcome_of(worker, exit_code, time.monotonic() - started)


def ray_worker_failed(worker: StudyWorker, error: BaseException, seconds: float) -> ChildOutcome:
    return ChildOutcome(worker.index, "FAILED", seconds=seconds, message=" ".join(str(error).split())[:300])


class LocalWorkers:
    """N workers on this machine: each its share of the cores, or its own GPUs."""

    def __init__(self, parallel: int | None, gpus_per_run: int | None, cpus_per_run: int | None):
        resolved = make_local_executor(parallel, gpus_per_run, cpus_per_run)
        self.parallel, self.threads, self.gpus_per_run = resolved.parallel, resolved.threads, resolved.gpus_per_run
        self.free_gpus = resolved.free_gpus
        self.running: dict[int, tuple[StudyWorker, subprocess.Popen, float]] = {}

    def describe(self) -> str:
        each = f"{self.gpus_per_run} GPU(s)" if self.gpus_per_run else f"{self.threads} CPU thread(s)"
        return f"{self.parallel} worker process(es) on this machine, {each} each"

    def start(self, worker: StudyWorker) -> None:
        worker.gpus = [self.free_gpus.pop(0) for _ in range(self.gpus_per_run)]
        self.running[worker.index] = (worker, start_worker(worker, self.threads, signal.SIGTERM), time.monotonic())

    def poll(self) -> list[ChildOutcome]:
        ended = [(index, code) for index, (_, process, _) in self.running.items()
                 if (code := process.poll()) is not None]
        outcomes = []
        for index, code in ended:
            worker, _, started = self.running.pop(index)
            outcomes.append(outcome_of(worker, code, time.monotonic() - started))
        return outcomes

    def stop(self) -> list[ChildOutcome]:
        for _, process, _ in self.running.values():  # all at once, then each waited for
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in self.running.values():
            stop_process(process)
        return self.poll()

    def close(self) -> None:
        pass


def make_workers(executor: str, parallel: int | None, gpus_per_run: int | None, cpus_per_run: int | None,
                 ray_address: str | None, plan: StudyPlan):
    """The executor of the study's workers, checked before anything starts (one line if not)."""
    if gpus_per_run is not None and gpus_per_run > 1:
        raise MlexpError(f"--gpus-per-run {gpus_per_run}: a trial trains in its worker's own process, on one GPU "
                         "at most; sweep a DDP configuration with `mlexp sweep`")
    if executor == "local":
        return LocalWorkers(parallel, gpus_per_run, cpus_per_run)
    workers = RayExecutor(ray_address, parallel, gpus_per_run, cpus_per_run, task=ray_study_worker,
                          on_failure=ray_worker_failed)
    if workers.nodes > 1 and not plan.storage:
        workers.close()
        raise MlexpError(f"the Ray cluster has {workers.nodes} nodes, and the study's journal file is on this "
                         "machine only: give --storage (an Optuna database every node reaches, e.g. "
                         "postgresql://mlexp@db/optuna)")
    return workers


# --- the launcher --------------------------------------------------------------------------------
def run_workers(plan: StudyPlan, place: Place, workers) -> None:
    """Start the workers, say how far the study is until they end, stop them if this launcher is
    stopped. A worker that failed is one line naming its log (exit status 1)."""
    logs = plan.out_dir.resolve() / plan.name / "workers"
    storage = optuna_storage(plan)
    print(f"mlexp: study {plan.name}: {workers.describe()}; their logs in {logs}/", flush=True)
    # each arm's study name, once: an older launch's name is found before any worker starts
    names = [arm_study_name(plan, storage, index, place) for index in range(len(plan.arms))]
    outcomes: list[ChildOutcome] = []
    said = None
    try:
        for index in range(workers.parallel):
            payload = plan_to_json(dataclasses.replace(plan, worker=index))
            workers.start(StudyWorker(index, payload, place.uri, str(logs / f"worker-{index}.log")))
        while workers.running:
            outcomes += workers.poll()
            said = say_progress(plan, storage, names, said)
            time.sleep(POLL_S)
        outcomes += workers.poll()
    except BaseException:
        workers.stop()
        raise
    finally:
        workers.close()
    say_progress(plan, storage, names, said)
    failed = [outcome for outcome in outcomes if outcome.status != "FINISHED"]
    if failed:
        first = failed[0]
        raise RunFailed(f"{len(failed)} study worker(s) ended {first.status} (worker {first.index}: exit status "
                        f"{first.exit_code}{', ' + first.message if first.message else ''}); see "
                        f"{logs}/worker-{first.index}.log, then run the same command again: the study goes on")


def say_progress(plan: StudyPlan, storage, names: list[str], said: str | None) -> str | None:
    """One line when the number of ended trials changed (the studies read, never written: a
    storage that does not answer now only skips a line)."""
    trials = []
    for name in names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            trials += counted(study)
        except KeyError:  # not created yet: no trial
            continue
        except Exception:  # noqa: BLE001 - progress is a courtesy; the workers carry on
            return said
    ended = [trial for trial in trials if trial.state.is_finished()]
    line = (f"mlexp: study {plan.name}: {len(ended)}/{plan.trials * len(plan.arms)} trial(s) ended "
            f"({sum(t.state == TrialState.PRUNED for t in ended)} pruned), {len(trials) - len(ended)} training")
    if line != said:
        print(line, flush=True)
    return line


def work(plan_json: str) -> None:
    """A worker: the study's loop, as one more launcher of it."""
    run_study(plan_from_json(plan_json), os.environ["MLFLOW_TRACKING_URI"])
