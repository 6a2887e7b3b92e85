"""Sweeps: a grid of configurations, each trained in its own process, as nested MLflow runs.

plan (`sweep.plan`) -> the grid's parent run (found or created, `tracking.claims`) -> children,
N at a time on this machine (`sweep.local_executor`) or as Ray tasks over a cluster (`sweep.ray_executor`)
-> summary. A configuration that FINISHED anywhere in the experiment is skipped, so
re-running an interrupted sweep trains only what is missing, and resumes each interrupted
child in its own run from its checkpoint (and a sweep with nothing left to train creates no
run at all). Each configuration is claimed on the tracking server before it trains, so
two launchers of one grid (or a launcher and a Ray retry) never train it twice; a launcher
waits for the configurations another one holds. A configuration that fails ends FAILED
with its error and the sweep goes on; `--retry-failed` trains the ones that failed before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mlexp import tracking
from mlexp.config import DEFAULT_EXPERIMENT, TrainConfig
from mlexp.errors import MlexpError
from mlexp.sweep.local_executor import ChildJob, ChildOutcome, forwarded_env
from mlexp.sweep.overrides import Overrides
from mlexp.sweep.plan import PlanRow, dry_run_comparison, expand_grid, format_plan, grid_hash, grid_params, sweep_name
from mlexp.sweep.progress import SweepProgress
from mlexp.sweep.summary import SweepResult, best_per_backbone, report
from mlexp.tasks.kinds import task_of
from mlexp.tracking import claims, server
from mlexp.tracking.outbox import Outbox
from mlexp.tracking.run import create_offline_run

POLL_S = 0.25  # how often the launcher looks at its children (a poll is cheap: no server request)
STATE_EVERY_S = 3.0  # how often it reads the grid's claims and runs from the server


@dataclass
class Launch:
    """How this launcher runs the grid: where (executor), as whom (owner), into which parent."""

    executor: object  # local_executor.LocalExecutor or ray_executor.RayExecutor
    tracking_uri: str
    offline: bool
    parent_run_id: str  # the grid's parent: claims live there and children nest under it
    experiment_id: str | None
    train_options: dict[str, str]  # the sweep's training options, as the user typed them
    retry_failed: bool = False
    log_dir: Path = field(default_factory=lambda: Path.cwd() / "mlexp-output" / "sweeps")
    owner: str = field(default_factory=claims.new_owner)


def finished_hashes(client, experiment_id: str) -> dict[str, str]:
    """config hash -> run id of every FINISHED run in the experiment that has one."""
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50000)
    return {run.data.tags["mlexp.config_hash"]: run.info.run_id for run in runs
            if "mlexp.config_hash" in run.data.tags}


def finished_before(tracking_uri: str, experiment: str) -> dict[str, str]:
    """config hash -> run id of the experiment's FINISHED runs (none if it does not exist yet)."""
    tracking.check_reachable(tracking_uri)
    client = tracking.client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return finished_hashes(client, found.experiment_id) if found is not None else {}


def run_sweep(base: TrainConfig, backbones: list[str], inits: list[str], strategies: list[str],
              seeds: list[int], folds: list[int], train_options: dict[str, str], make_executor,
              retry_failed: bool = False, parent_run_id: str | None = None,
              overrides: Overrides | None = None) -> SweepResult:
    """Train every configuration of the grid that has not finished before; summarise.

    `train_options`: the sweep's training options as typed (each child gets them).
    `make_executor()`: the executor, made (and checked) before any run exists.
    `parent_run_id`: an existing run to be the sweep's parent (the one `mlflow run` created).
    `overrides`: per-strategy and per-init epochs and lr (`sweep.overrides`).
    """
    rows = expand_grid(base, backbones, inits, strategies, seeds, folds, overrides)
    if base.dry_run:  # the configuration comparison, then the plan
        print(dry_run_comparison(rows) + "\n", flush=True)
    print(format_plan(rows), flush=True)
    if base.dry_run:
        return SweepResult(None)
    executor = make_executor()  # bad --parallel, --gpus-per-run, no Ray: a user error, no run created
    try:
        # Bad data is a user error before any run exists; an official split's every fold (a missing split file)
        for fold in folds[:1] if base.folds else folds:
            task_of(base).check_data(base.replace(fold=fold))
        uri = absolute_uri(base.tracking_uri or tracking.default_tracking_uri())
        offline = tracking.offline_requested(base.offline)
        # Offline, the server's finished runs cannot be looked up: every configuration trains.
        done = {} if offline else finished_before(uri, base.experiment)
        if parent_run_id is None and rows and all(row.config_hash in done for row in rows):
            print(f"\nEvery configuration FINISHED before (runs {', '.join(done[row.config_hash] for row in rows)});"
                  " nothing to train.", flush=True)
            return SweepResult(None, skipped=[done[row.config_hash] for row in rows])
        name = base.run_name or sweep_name(backbones, rows)
        parent, grid_parent, experiment_id = open_parent(uri, base.experiment, name, rows, parent_run_id, offline)
        launch = Launch(executor, uri, offline, grid_parent, experiment_id, train_options, retry_failed)
        return supervise(parent, launch, rows, done,
                         grid_params(backbones, inits, strategies, seeds, folds, rows, overrides))
    finally:
        executor.close()


def absolute_uri(uri: str) -> str:
    """A SQLite store by its absolute path: children (and Ray workers) may start elsewhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def open_parent(uri: str, experiment: str, name: str, rows: list[PlanRow], project_run_id: str | None,
                offline: bool) -> tuple[tracking.RunTracker | None, str, str | None]:
    """(the run this launcher reports into, the grid's parent run id, the experiment id).

    The grid's parent is found or created on the server, safely when launchers race
    (`claims.sweep_parent`). Usually this launcher reports into it too; not when another
    launcher on this machine already does (None), nor under `mlflow run` when the grid
    already had a parent (the project's run then reports, and points to the parent)."""
    tags = {"mlexp.sweep": "true", "mlexp.sweep_size": str(len(rows)), claims.GRID_TAG: grid_hash(rows)}
    if offline:
        parent = tracking.open_run(uri, experiment, name, offline=True, tags=tags)
        return parent, parent.run_id, None
    client = tracking.client_for(uri)
    if project_run_id:
        experiment_id = client.get_run(project_run_id).info.experiment_id
    else:
        experiment_id = server.experiment_id_for(client, experiment)

    def candidate() -> str:
        if project_run_id:
            server.set_tags(client, project_run_id, {claims.GRID_TAG: tags[claims.GRID_TAG]})
            return project_run_id
        return server.create_run(client, experiment_id, name, tags)

    grid_parent, _ = claims.sweep_parent(client, experiment_id, tags[claims.GRID_TAG], candidate,
                                         keep=project_run_id)
    reporter = project_run_id or grid_parent
    try:
        parent = tracking.open_run(uri, experiment, name, run_id=reporter,
                                   tags={**tags, "mlexp.sweep_parent": grid_parent})
    except MlexpError:  # its outbox is held: another launcher on this machine reports this sweep
        print(f"mlexp: joining sweep {grid_parent}, which another launcher on this machine reports; this one "
              "trains what is left", flush=True)
        return None, grid_parent, experiment_id
    parent.mark_running()
    return parent, grid_parent, experiment_id


def supervise(parent: tracking.RunTracker | None, launch: Launch, rows: list[PlanRow], done: dict[str, str],
              params: dict[str, str]) -> SweepResult:
    """Run the grid and end the parent run with what is true of it."""
    result = SweepResult(launch.parent_run_id)
    if parent is not None:
        parent.log_params(params)
    try:
        train_grid(parent, launch, rows, done, result)
        if not launch.offline:
            try:
                client = tracking.client_for(launch.tracking_uri)
                result.best = best_per_backbone(client, [*result.finished, *result.skipped, *result.elsewhere])
            except Exception as error:  # noqa: BLE001 - a summary read is no reason to fail the sweep
                print(f"mlexp: no best-run summary: the server did not answer ({error})", flush=True)
        report(parent, result)
    except BaseException as error:
        if parent is not None:
            parent.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", error=str(error))
        raise
    if parent is None:
        return result
    every_one_failed = bool(result.failed) and not (result.finished or result.skipped or result.elsewhere)
    delivery = parent.finish("FAILED" if every_one_failed else "FINISHED",
                             error="every configuration FAILED" if every_one_failed else None)
    if not delivery.complete:
        print(f"mlexp: sweep run {delivery.run_id}: {delivery.describe()}", flush=True)
    return result


def train_grid(parent: tracking.RunTracker | None, launch: Launch, rows: list[PlanRow], done: dict[str, str],
               result: SweepResult) -> None:
    """Start children while there is room, as their claims allow; collect their outcomes."""
    executor = launch.executor
    total = len(rows)
    pending = []
    for row in rows:
        if row.config_hash in done:
            print(f"[{row.index}/{total}] {row.run_name}: FINISHED before as run {done[row.config_hash]}; skipped")
            result.skipped.append(done[row.config_hash])
        else:
            pending.append(row)
    jobs = {row.index: child_job(launch, row, total) for row in pending}
    by_index = {row.index: row for row in rows}
    progress = SweepProgress(total, len(result.skipped), concurrency=executor.parallel)
    print(f"\nTraining {len(pending)} configuration(s), {executor.describe()}; logs in "
          f"{relative(launch.log_dir / launch.parent_run_id)}/", flush=True)
    state = None if launch.offline else claims.read_state(tracking.client_for(launch.tracking_uri),
                                                          launch.experiment_id, launch.parent_run_id)
    # --retry-failed: the configurations that had FAILED when this sweep started (once each)
    failed_before = {h for h, run in state.children.items() if run.info.status == "FAILED"} if state else set()
    state_at, waiting = time.monotonic(), set()
    try:
        while pending or executor.running:
            for outcome in executor.poll():
                finish_child(outcome, by_index[outcome.index], jobs[outcome.index], result, progress, parent,
                             pending)
            if pending and not launch.offline and time.monotonic() - state_at >= STATE_EVERY_S:
                state, state_at = claims.read_state(tracking.client_for(launch.tracking_uri), launch.experiment_id,
                                                    launch.parent_run_id), time.monotonic()
            for row in list(pending):
                if not executor.has_room():
                    break
                verdict = decide(row, state, launch, failed_before, waiting)
                if verdict == "wait":
                    continue
                pending.remove(row)
                if verdict != "start":
                    record_elsewhere(row, verdict, state, result, progress, total)
                    continue
                where = executor.start(jobs[row.index])
                if where is None:  # another launcher won this claim: look again later
                    pending.append(row)
                    state_at = 0.0
                    continue
                progress.started += 1
                progress.write(f"[{row.index}/{total}] started {row.run_name} ({where})")
            progress.show(running=len(executor.running), remaining=len(pending))
            if pending or executor.running:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(f"\nmlexp: interrupted: stopping {len(executor.running)} child run(s) (they end KILLED)", flush=True)
        for outcome in executor.stop():
            finish_child(outcome, by_index[outcome.index], jobs[outcome.index], result, progress, parent, pending)
        print("mlexp: run the same command again to continue where the sweep stopped", flush=True)
        raise
    finally:
        progress.close()


def relative(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def decide(row: PlanRow, state: claims.GridState | None, launch: Launch, failed_before: set[str],
           waiting: set[int]) -> str:
    """What to do with a pending configuration now: start, wait (another launcher holds it),
    or take it as ended elsewhere (FINISHED, or FAILED and not to be retried)."""
    if state is None:  # offline: nobody else can hold it
        return "start"
    status = state.status(row.config_hash)
    if status == "FINISHED":
        return "FINISHED"
    if status == "FAILED" and not (launch.retry_failed and row.config_hash in failed_before):
        return "FAILED"
    holder = state.held_elsewhere(row.config_hash, launch.owner)
    if holder:
        if row.index not in waiting:
            waiting.add(row.index)
            print(f"  {row.run_name}: being trained by launcher {holder}; waiting for it", flush=True)
        return "wait"
    return "start"


def record_elsewhere(row: PlanRow, status: str, state: claims.GridState, result: SweepResult,
                     progress: SweepProgress, total: int) -> None:
    run_id = state.children[row.config_hash].info.run_id
    if status == "FINISHED":
        result.elsewhere.append(run_id)
        progress.finished += 1
    else:
        result.failed.append(run_id)
        progress.failed += 1
    print(f"[{row.index}/{total}] {row.run_name}: {status} (run {run_id}"
          + (", trained by another launcher)" if status == "FINISHED" else "; `--retry-failed` trains it again)"),
          flush=True)


def child_job(launch: Launch, row: PlanRow, total: int) -> ChildJob:
    return ChildJob(index=row.index, total=total, label=row.label, run_name=row.run_name,
                    config_hash=row.config_hash, train_args=row.train_args(launch.train_options),
                    tracking_uri=launch.tracking_uri, experiment_id=launch.experiment_id,
                    parent_run_id=launch.parent_run_id, owner=launch.owner,
                    log_path=str(launch.log_dir / launch.parent_run_id / f"{row.index:03d}-{row.run_name}.log"),
                    offline=launch.offline, retry_failed=launch.retry_failed,
                    run_id=offline_child(launch, row) if launch.offline else None,
                    env=forwarded_env(), gpus_per_run=getattr(launch.executor, "gpus_per_run", 0))


def offline_child(launch: Launch, row: PlanRow) -> str:
    parent = Outbox.find(launch.parent_run_id)
    tags = {"mlexp.sweep_id": launch.parent_run_id, "mlexp.config_hash": row.config_hash,
            "mlflow.runName": row.run_name}
    return create_offline_run(parent.info().experiment or DEFAULT_EXPERIMENT, row.run_name, launch.parent_run_id,
                              tags).info().local_id


def finish_child(outcome: ChildOutcome, row: PlanRow, job: ChildJob, result: SweepResult, progress: SweepProgress,
                 parent: tracking.RunTracker | None, pending: list[PlanRow]) -> None:
    total = job.total
    if outcome.status == "ELSEWHERE":  # a Ray task found the configuration claimed: look again later
        pending.append(row)
        return
    if outcome.status == "FINISHED":
        result.finished.append(outcome.run_id)
        progress.finished += 1
        progress.durations.append(outcome.seconds)
        acc = f"best {outcome.best[0]} {outcome.best[1]:.4f}" if outcome.best is not None else "best val acc -"
        line = f"[{row.index}/{total}] FINISHED {row.run_name}  {acc}  {outcome.seconds:.1f} s"
        line += f"  ({outcome.message})" if outcome.message else ""
    elif outcome.status == "KILLED":
        result.killed.append(outcome.run_id)
        progress.killed += 1
        line = f"[{row.index}/{total}] KILLED {row.run_name} (run {outcome.run_id}; resumable)"
    else:
        result.failed.append(outcome.run_id or f"(not started) {row.label}")
        progress.failed += 1
        line = f"[{row.index}/{total}] FAILED {row.run_name}: {outcome.message} (log: {relative(Path(job.log_path))})"
    progress.write(line)
    if parent is not None:
        parent.log_metrics({"sweep/finished": progress.finished + len(result.skipped), "sweep/failed": progress.failed,
                            "sweep/running": max(progress.started - progress.ended, 0),
                            "sweep/remaining": len(pending)}, step=progress.ended)
