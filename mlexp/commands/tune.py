"""`mlexp tune` (and `mlflow run . -e tune`): arms tuned with equal budgets, their best retrained
over paired seeds, and compared (mlexp.sweep.study)."""

# Imported where used: `mlexp.tasks` (it loads torch, about 2 s), which `mlexp tune --help`
# does not need.
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from mlexp.commands.declarations import TuneOptions
from mlexp.commands.options import CONTEXT, build_config, config_options, declared_options, parse_options
from mlexp.config import parse_value
from mlexp.errors import MlexpError
from mlexp.models.preflight import preflight
from mlexp.sweep.local_executor import check_counts
from mlexp.sweep.plan import INITS
from mlexp.sweep.ray_executor import import_ray
from mlexp.sweep.space import parse_space

# What a study sets per trial or per arm: not training options of the study.
TUNE_AXES = ("backbone", "init", "strategy", "seed", "resume", "folds", "fold",
             "scratch_lr_mult", "scratch_epochs_mult", "scratch_warmup_mult", "scratch_wd_mult")  # off: equal budgets


@click.command("tune", context_settings=CONTEXT)
@declared_options(TuneOptions)
@config_options(exclude=TUNE_AXES)
def tune_command(**values: Any) -> None:
    """Tune every arm with the same budget, retrain each arm's best over paired seeds, compare.

    The arms are backbones x inits x strategies. Each gets --trials trials of --epochs epochs,
    proposed by --sampler over --space (one search space for all), and Optuna's --pruner stops
    hopeless ones after an epoch (tag mlexp.trial_state=PRUNED, their curves kept). The scratch
    multipliers are off: what a scratch arm trains with is what its search found. Then each
    arm's best trial on validation is retrained with every --final-seeds seed, and `compare`
    pairs those final runs (mlexp-output/tune/STUDY/compare/report.md, with a tuning section:
    the budget of each arm, the values it chose, how close its best trials were).

    Every trial and final run is an mlexp run under the study's parent run. Re-running the same
    command continues the study (its trials are in Optuna's journal, mlexp-output/tune/, or in
    --storage); a trial whose launcher was killed resumes in its own run, and two launchers of
    one study never train a trial twice. --parallel N trains N trials at once (N worker
    processes here, each with its share of the cores or its own GPU); --executor ray spreads
    the workers over a Ray cluster (with --storage, on more than one node). --dry-run prints
    the plan and its worst-case cost.

    \b
    Examples:
      mlexp tune --backbones resnet18 --space 'lr=1e-4:1e-1:log,weight_decay=0:0.1' --trials 20 --epochs 10
      mlexp tune --backbones resnet50 --strategies linear,full --space 'lr=1e-5:1e-1:log' --sampler qmc
      mlexp tune --backbones resnet18 --inits scratch --space 'lr=0.01,0.03,0.1' --sampler grid --trials 3
      mlexp tune --backbones resnet18 --space 'lr=1e-4:1e-1:log' --trials 16 --parallel 4
    """
    tune_with(values)


@click.command("study-worker", hidden=True, context_settings=CONTEXT)
def study_worker_command() -> None:
    """One worker of `mlexp tune --parallel N` or `--executor ray`: started by the study's
    launcher, which writes the study's plan to its stdin."""
    from mlexp.sweep.study_workers import work  # here: torch and Optuna

    work(sys.stdin.read())


def tune_with(values: dict[str, Any], project_run_id: str | None = None) -> None:
    """The study the options describe; `project_run_id`: the run `mlflow run` created for it."""
    from mlexp.sweep.study import open_study_parent, run_study  # here: torch and Optuna
    from mlexp.sweep.study_plan import Arm, StudyPlan
    from mlexp.sweep.study_workers import make_workers, run_workers
    from mlexp.tracking import default_tracking_uri

    own = parse_options(TuneOptions, values)
    training_values = {name: value for name, value in values.items() if name not in TuneOptions.__dataclass_fields__}
    if own.space is None:
        raise MlexpError("--space is required: the values to search, e.g. --space 'lr=1e-4:1e-1:log'")
    space = parse_space(own.space)
    if own.storage and urlsplit(own.storage).password:  # -P values and command lines are written down
        raise MlexpError("--storage must not carry a password (mlflow run logs its parameters, `ps` shows command "
                         "lines): give it in PGPASSWORD or ~/.pgpass, e.g. --storage postgresql://mlexp@db/optuna")
    if own.trials < 1:
        raise MlexpError(f"--trials must be at least 1, got {own.trials}")
    check_launch(own)
    if own.sampler == "grid":
        for dimension in space:
            dimension.grid_values()  # a grid lists its values: one line for a range
    for init in own.inits:
        if init not in INITS:
            raise MlexpError(f"--inits takes {', '.join(INITS)}, got {init!r}")
    base = build_config(training_values)
    arms = [Arm(backbone, init, strategy) for backbone in own.backbones for init in own.inits
            for strategy in own.strategies]
    plan = StudyPlan(base, arms, space, own.sampler, own.search_seed, own.trials, own.pruner,
                     [parse_value("final-seeds", int, seed) for seed in own.final_seeds], own.storage)
    check_arms(plan)
    if base.dry_run:
        click.echo(describe_plan(plan) + "\n" + describe_width(own))
        return
    uri = base.tracking_uri or default_tracking_uri()
    if own.executor == "ray" or (own.parallel or 1) > 1:
        workers = make_workers(own.executor, own.parallel, own.gpus_per_run, own.cpus_per_run, own.ray_address, plan)
        run_workers(plan, open_study_parent(plan, uri, project_run_id), workers)  # the parent first: they join it
    result = run_study(plan, uri, project_run_id)  # after workers: nothing left to train, the study's result
    compare_finals(plan, result, uri)


def check_launch(own: TuneOptions) -> None:
    """--parallel, --cpus-per-run, --executor: one line now for a bad value."""
    if own.ray_address and own.executor != "ray":
        raise MlexpError("--ray-address needs --executor ray")
    if (own.cpus_per_run or own.gpus_per_run) and own.executor != "ray" and (own.parallel or 1) == 1:
        raise MlexpError("--cpus-per-run and --gpus-per-run size the workers of --parallel N (or --executor ray); "
                         "a study without them trains in this process")
    check_counts(own.parallel, own.gpus_per_run, own.cpus_per_run)
    if own.executor == "ray":
        import_ray()  # not installed: one line now


def check_arms(plan) -> None:
    """Each arm's configuration as a trial would train it, checked before anything starts: its
    backbone, its weights, its data, and every value of the space inside what the option takes."""
    from mlexp.tasks.kinds import task_of

    for arm in plan.arms:
        for dimension in plan.space:
            for value in ((dimension.low, dimension.high) if dimension.kind != "choice" else dimension.choices):
                plan.trial_config(arm, {dimension.name: value})  # validates (one line for a value out of range)
        cfg = plan.trial_config(arm, {})
        preflight(cfg)
        task_of(cfg).check_data(cfg)


def describe_width(own: TuneOptions) -> str:
    """How many trials train at once, and where."""
    if own.executor == "ray":
        return f"trials at once: {own.parallel or 'as many as the Ray cluster has room for'}, as Ray tasks"
    if (own.parallel or 1) > 1:
        return f"trials at once: {own.parallel}, as worker processes on this machine"
    return "trials at once: 1, in this process (--parallel N for N)"


def describe_plan(plan) -> str:
    lines = [f"Study {plan.name}: {len(plan.arms)} arm(s), each {plan.trials} trial(s) of {plan.base.epochs} "
             f"epoch(s) ({plan.sampler} sampler, seed {plan.seed}; {plan.pruner} pruner on {plan.metric})",
             "arms: " + ", ".join(arm.label for arm in plan.arms),
             "space: " + "; ".join(dimension.describe() for dimension in plan.space),
             f"final stage: each arm's best trial with seeds {', '.join(map(str, plan.final_seeds))}",
             f"worst case (no trial pruned): {plan.worst_case_epochs()} epochs in all, "
             f"{plan.worst_case_epochs() // max(len(plan.arms), 1)} per arm (equal budgets)"]
    return "\n".join(lines)


def compare_finals(plan, result, uri: str) -> None:
    """`compare` over the final runs, its report.md given the tuning section, logged to a
    compare run (as `mlexp compare` logs its own) named after the study."""
    from mlexp.analysis.compare import compare_run_place, format_table, run_compare  # here: pandas and matplotlib
    from mlexp.analysis.report import log_compare_run
    from mlexp.analysis.tuning import PLOTS_PATH, study_plots, tuning_section
    from mlexp.tracking import client_for, server

    plots = plan.out_dir / plan.name / PLOTS_PATH
    try:  # the plots are a view of the search: without them the report still stands
        study_plots(result.studies, plots)
        server.upload_folder(client_for(uri), result.parent_run_id, plots, PLOTS_PATH)
    except Exception as error:  # noqa: BLE001 - said, and the report is written
        click.echo(f"mlexp: warning: the study's plots were not logged ({type(error).__name__}: {error})", err=True)

    out = plan.out_dir / plan.name / "compare"
    compared = run_compare(uri, [plan.base.experiment], f"tags.`mlexp.study` = '{plan.name}' and "
                           "tags.`mlexp.study_stage` = 'final'", ["backbone", "strategy"], out, log_run=False)
    report = Path(out) / "report.md"
    report.write_text(report.read_text() + "\n" + tuning_section(plan, result))
    experiment, _ = compare_run_place(compared)
    compare_run = log_compare_run(uri, compared, Path(out), experiment, f"tune {plan.name}")
    click.echo(format_table(compared))
    click.echo(f"mlexp: study {plan.name} FINISHED: {out}/report.md (its tuning section says what each arm "
               f"was given and chose; logged to run {compare_run} in {experiment}); the runs are under parent "
               f"run {result.parent_run_id}")
