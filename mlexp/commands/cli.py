"""The `mlexp` command line. Options come from their declarations; the CLI never builds a model.

Training's options are `TrainConfig`'s; every other command declares its own once
(`commands.declarations`). User errors (MlexpError, bad or unknown options) print one line
and exit with status 2.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import click

from mlexp.commands.models import evaluate_command, register_command
from mlexp.commands.options import CONTEXT, Commands, build_config, config_options, join_list_options, user_errors
from mlexp.commands.runs import compare_command, monitor_command, reap_command, sync_command
from mlexp.commands.sweep import sweep_command
from mlexp.commands.tune import study_worker_command, tune_command
from mlexp.config import TrainConfig
from mlexp.credentials import adopt_environment, adopt_uri_credentials
from mlexp.models.catalogue import catalogue_rows
from mlexp.models.preflight import preflight
from mlexp.training.recipes import preset_rows


@click.group(cls=Commands, context_settings=CONTEXT)
@click.version_option(package_name="mlexp")
def cli() -> None:
    """Tracked image-classification experiments: timm backbones, Accelerate loops, MLflow.

    Every run logs its effective parameters, per-batch and per-epoch metrics and its
    checkpoints to MLflow (default store: sqlite:///mlflow.db in the current folder,
    or $MLFLOW_TRACKING_URI).
    """


@cli.command(context_settings=CONTEXT)
@config_options()
@click.option("--run-id", "run_id", default="", metavar="RUN_ID",
              help="Train into this existing MLflow run (a sweep creates its children first); a run that "
                   "started training before continues from its newest checkpoint.")
def train(**values: Any) -> None:
    """Train one backbone and log the run to MLflow.

    \b
    Examples:
      mlexp train --backbone resnet18 --data digits --epochs 3
      mlexp train --backbone resnet50_scratch --data /data/flowers --img-size 128
      mlexp train --resume RUN_ID
      torchrun --nproc_per_node 2 -m mlexp train --backbone resnet18
    """
    run_id = values.pop("run_id") or None
    train_with(build_config(values), run_id=run_id)


def train_with(cfg: TrainConfig, run_id: str | None = None) -> None:
    """Train one run; `run_id`: log into that existing run (the one `mlflow run` created)."""
    spec = preflight(cfg)  # unknown backbone, missing weights offline: fail before torch/timm load (~3 s)
    from mlexp.training.run import run_training  # here: torch, timm and MLflow load only once the config passed

    run_training(cfg, run_id=run_id, spec=spec)


PRETRAIN_DEFAULTS = {"recipe": "pretrain", "init": "scratch", "export_weights": "true"}


@cli.command(context_settings=CONTEXT)
@config_options()
def pretrain(**values: Any) -> None:
    """Pretrain a backbone from scratch (a modern ImageNet-style recipe) and export its weights.

    `mlexp train` with different defaults: --recipe pretrain (SGD, lr 0.1 x global batch/256,
    warmup 5, label smoothing 0.1, mixup 0.2, cutmix 1.0, RandAugment n2 m9, cosine), --init
    scratch and --export-weights, so the final weights land in $MLEXP_WEIGHTS_DIR (or
    ./weights/) as ARCH.safetensors, where every later pretrained run of that backbone finds
    them without a flag. Interrupted? `mlexp train --resume RUN_ID` continues it.

    \b
    Examples:
      torchrun --nproc_per_node 4 -m mlexp pretrain --backbone resnet50 --data /imagenet --epochs 300
      mlexp pretrain --backbone resnet18 --data synthetic --epochs 2     (a smoke test)
    """
    train_with(build_config(values, PRETRAIN_DEFAULTS))


for command in (sweep_command, tune_command, compare_command, evaluate_command, register_command, monitor_command, sync_command,
                reap_command, study_worker_command):
    cli.add_command(command)


@cli.command(context_settings=CONTEXT)
def backbones() -> None:
    """List the backbone catalogue: names, timm models, init, size, weight sources."""
    print_table(catalogue_rows())


@cli.command(context_settings=CONTEXT)
def recipes() -> None:
    """List the recipe presets usable with --recipe."""
    print_table(preset_rows())


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(str(c).ljust(widths[c]) for c in columns))
    click.echo("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def main(argv: list[str] | None = None) -> None:
    """The `mlexp` command: run the CLI, user errors as one line and exit status 2."""
    try:
        with user_errors():
            adopt_environment()  # http(s) credentials in a URI go to MLflow's variables, nowhere else
            args = without_uri_credentials(join_list_options(sys.argv[1:] if argv is None else argv))
            cli.main(args=args, prog_name="mlexp", standalone_mode=False)
    finally:
        if argv is None:  # the whole process is this command (in-process callers keep their collector)
            shorten_shutdown()


def shorten_shutdown() -> None:
    """Python's shutdown runs full collections over every object torch, timm and MLflow made,
    about 1 s of each command on 2 cores. Freezing them first leaves it a third of that: atexit
    handlers (the loaders' worker processes ended, log files closed) and the joins of running
    threads are untouched; what the command opened it has closed itself. (No collection here
    either: one now would finalize a data loader while its workers still live, and wait on them.)"""
    gc.freeze()


URI_OPTIONS = ("--tracking-uri", "--to")


def without_uri_credentials(argv: list[str]) -> list[str]:
    """The URI options' values with their http(s) credentials adopted (mlexp.credentials)."""
    cleaned = list(argv)
    for index, arg in enumerate(cleaned):
        name, equals, value = arg.partition("=")
        if name in URI_OPTIONS and equals:
            cleaned[index] = f"{name}={adopt_uri_credentials(value)}"
        elif arg in URI_OPTIONS and index + 1 < len(cleaned):
            cleaned[index + 1] = adopt_uri_credentials(cleaned[index + 1])
    return cleaned
