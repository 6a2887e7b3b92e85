"""`mlexp sweep` (and `mlflow run . -e sweep`): a grid of training runs as nested MLflow runs."""

from __future__ import annotations

import sys
from typing import Any

import click

from mlexp.commands.declarations import SweepOptions
from mlexp.commands.options import CONTEXT, build_config, config_options, declared_options, parse_options, user_values
from mlexp.config import parse_value
from mlexp.errors import MlexpError
from mlexp.sweep.local_executor import check_counts, make_local_executor
from mlexp.sweep.overrides import OPTIONS as OVERRIDE_OPTIONS
from mlexp.sweep.overrides import Overrides
from mlexp.sweep.plan import INITS, sweep_folds
from mlexp.sweep.ray_executor import RayExecutor, import_ray

# The grid's axes: a sweep sets these per child, so they are not training options of the sweep.
SWEEP_AXES = ("backbone", "init", "strategy", "seed", "folds", "fold", "resume")


@click.command("sweep", context_settings=CONTEXT)
@declared_options(SweepOptions)
@config_options(exclude=SWEEP_AXES)
def sweep_command(**values: Any) -> None:
    """Train a grid: backbones x inits x strategies x seeds x folds, as nested MLflow runs.

    Each configuration trains in its own `mlexp train` process (its output in
    mlexp-output/sweeps/PARENT_RUN/), --parallel N at a time; --executor ray spreads them
    over a Ray cluster. Every other option is a training option applied to each run (see
    `mlexp train --help`); `--folds K` runs each configuration on all K folds, and on data
    with a split of its own (DTD's labels/train1.txt ... test10.txt, --splits FILE) `--folds
    1-10` or `--folds 1,3,5` runs it on those of its folds.
    --strategy-epochs/--strategy-lr and --init-epochs/--init-lr set them per strategy or init.

    Configurations that already FINISHED in the experiment are skipped, and interrupted ones
    resume their own run from their checkpoint, so re-running an interrupted sweep (or
    Ctrl-C, then the same command) picks up where it stopped. Each configuration is claimed
    on the tracking server first: two launchers of one grid never train it twice. A team
    shares one `mlflow server` (README: a team server on PostgreSQL); a SQLite store is for
    one machine. `--dry-run` prints the numbered plan. Exits 1 when a configuration FAILED.

    \b
    Examples:
      mlexp sweep --backbones resnet18,resnet50 --seeds 1,2,3 --folds 5 --epochs 10
      mlexp sweep --data torchvision:DTD:/data/dtd --folds 1-10 --seeds 42,43,44
      mlexp sweep --backbones resnet18 resnet50 deit_small --scratch-only --parallel 2
      mlexp sweep --strategies linear,full --strategy-epochs linear=15,full=30 --init-epochs scratch=20
      mlexp sweep --backbones resnet50 --gpus-per-run 2            (8 GPUs: 4 DDP children at once)
      mlexp sweep --executor ray --ray-address auto --tracking-uri http://mlflow.lab:5000
    """
    sweep_with(values)


def sweep_with(values: dict[str, Any], parent_run_id: str | None = None) -> None:
    """Run the grid the sweep options describe; `parent_run_id`: the sweep's existing run."""
    from mlexp.sweep.launcher import run_sweep  # here: the launcher loads torch (the data checks)

    own = parse_options(SweepOptions, values)
    training_values = {name: value for name, value in values.items() if name not in SweepOptions.__dataclass_fields__}
    if own.pretrained_only and own.scratch_only:
        raise MlexpError("--pretrained-only and --scratch-only exclude each other")
    inits = ["pretrained"] if own.pretrained_only else ["scratch"] if own.scratch_only else list(own.inits)
    for init in inits:
        if init not in INITS:
            raise MlexpError(f"--inits takes {', '.join(INITS)}, got {init!r}")
    seeds = [parse_value("seeds", int, seed) for seed in own.seeds]
    overrides = Overrides.parse({name: getattr(own, name) for name in OVERRIDE_OPTIONS}, list(own.strategies), INITS)
    make_executor = executor_factory(own)
    base = build_config(training_values, world_size=max(own.gpus_per_run or 1, 1))  # a child's DDP processes
    base, folds = sweep_folds(base, own.folds, own.fold)
    for strategy in own.strategies:
        base.replace(strategy=strategy)  # validates the name
    # What each child gets: the training options as typed, but for the sweep's own run name (its
    # parent's) and the tracking URI: a database URI's password on a child's command line would
    # show in every local user's `ps`, so children take the URI from their environment.
    train_options = {name: value for name, value in user_values(training_values).items()
                     if name not in ("run_name", "tracking_uri")}
    result = run_sweep(base, list(own.backbones), inits, list(own.strategies), seeds, folds, train_options,
                       make_executor, retry_failed=own.retry_failed, parent_run_id=parent_run_id, overrides=overrides)
    if result.failed or result.killed:
        what = f"{len(result.failed)} configuration(s) FAILED" if result.failed else "some configurations were KILLED"
        click.echo(f"mlexp: {what}; see the runs' mlexp.error tag, or run the sweep again", err=True)
        sys.exit(1)


def executor_factory(own: SweepOptions):
    """Check the launch options now (a bad value fails before anything starts); the executor
    itself is made once the plan is printed."""
    if own.ray_address and own.executor != "ray":
        raise MlexpError("--ray-address needs --executor ray")
    counts = {"parallel": own.parallel, "gpus_per_run": own.gpus_per_run, "cpus_per_run": own.cpus_per_run}
    check_counts(**counts)
    if own.executor == "ray":
        import_ray()  # not installed: one line now
        return lambda: RayExecutor(own.ray_address, **counts)
    return lambda: make_local_executor(**counts)
