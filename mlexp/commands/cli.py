"""The `mlexp` command line. Options come from TrainConfig; the CLI never builds a model.

User errors (MlexpError, bad or unknown options) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from mlexp.commands.options import Commands, build_config, config_options, join_list_options, user_errors
from mlexp.config import TrainConfig
from mlexp.errors import MlexpError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
# The store every reading or registering command talks to (training takes it from TrainConfig).
tracking_uri_option = click.option("--tracking-uri", "tracking_uri", default="", metavar="TEXT",
                                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                        "sqlite:///mlflow.db).")


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
    from mlexp.models.preflight import preflight

    spec = preflight(cfg)  # unknown backbone, missing weights offline: fail before torch/timm load (~3 s)
    from mlexp.training.run import run_training

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


SWEEP_AXES = ("backbone", "init", "strategy", "seed", "fold", "resume")


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@cli.command(context_settings=CONTEXT)
@click.option("--backbones", default="resnet18", show_default=True,
              help="Comma-separated backbones; a plain name (resnet50) expands to both inits.")
@click.option("--inits", default="pretrained,scratch", show_default=True, help="Comma-separated inits to try.")
@click.option("--pretrained-only", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Only the pretrained flavour of each backbone.")
@click.option("--scratch-only", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Only the scratch flavour of each backbone.")
@click.option("--strategies", default="full", show_default=True, help="Comma-separated: full, linear, gradual.")
@click.option("--seeds", default="42", show_default=True, help="Comma-separated seeds.")
@click.option("--parallel", default="", metavar="N",
              help="Children training at once. (default: one per GPU (GPUs // --gpus-per-run); 1 on CPU, "
                   "where N children share the cores, cores // N threads each; with Ray: the cluster's room)")
@click.option("--gpus-per-run", "gpus_per_run", default="", metavar="K",
              help="GPUs per child; K > 1 trains each child as a K-process DDP run (torchrun). "
                   "(default: 1 on a GPU machine, 0 on CPU)")
@click.option("--cpus-per-run", "cpus_per_run", default="", metavar="C",
              help="CPU cores (threads) per child. (default: cores // N here; 1 per Ray task)")
@click.option("--executor", default="local", metavar="[local|ray]",
              help="local: children on this machine; ray: Ray tasks over a Ray cluster "
                   "(pip install 'mlexp[ray]'). (default: local)")
@click.option("--ray-address", "ray_address", default="", metavar="auto|HOST:PORT",
              help="The Ray cluster to use (`ray start --head` prints it). (default: a new local Ray instance)")
@click.option("--retry-failed", "retry_failed", is_flag=False, flag_value="true", default="false",
              metavar="[BOOL]", help="Train again the configurations that FAILED in an earlier run of this sweep "
                                     "(each resumes its run from its last checkpoint).")
@config_options(exclude=SWEEP_AXES)
def sweep(**values: Any) -> None:
    """Train a grid: backbones x inits x strategies x seeds x folds, as nested MLflow runs.

    Each configuration trains in its own `mlexp train` process (its output in
    mlexp-output/sweeps/PARENT_RUN/), --parallel N at a time; --executor ray spreads them
    over a Ray cluster. Every other option is a training option applied to each run (see
    `mlexp train --help`); `--folds K` runs each configuration on all K folds.

    Configurations that already FINISHED in the experiment are skipped, and interrupted ones
    resume their own run from their checkpoint, so re-running an interrupted sweep (or
    Ctrl-C, then the same command) picks up where it stopped. Each configuration is claimed
    on the tracking server first: two launchers of one grid never train it twice. A team
    shares one `mlflow server` (README: a team server on PostgreSQL); a SQLite store is for
    one machine. `--dry-run` prints the numbered plan. Exits 1 when a configuration FAILED.

    \b
    Examples:
      mlexp sweep --backbones resnet18,resnet50 --seeds 1,2,3 --folds 5 --epochs 10
      mlexp sweep --backbones resnet18 resnet50 deit_small --scratch-only --parallel 2
      mlexp sweep --backbones resnet50 --gpus-per-run 2            (8 GPUs: 4 DDP children at once)
      mlexp sweep --executor ray --ray-address auto --tracking-uri http://mlflow.lab:5000
    """
    sweep_with(values)


def sweep_with(values: dict[str, Any], parent_run_id: str | None = None) -> None:
    """Run the grid the sweep options describe; `parent_run_id`: the sweep's existing run."""
    from mlexp.commands.options import user_values
    from mlexp.config import parse_value
    from mlexp.sweep.launcher import run_sweep
    from mlexp.sweep.plan import INITS

    axes = {name: comma_list(values.pop(name) or "") for name in ("backbones", "inits", "strategies", "seeds")}
    pretrained_only = parse_value("pretrained_only", bool, values.pop("pretrained_only") or "false")
    scratch_only = parse_value("scratch_only", bool, values.pop("scratch_only") or "false")
    launch = {name: values.pop(name) or "" for name in LAUNCH_OPTIONS}
    if pretrained_only and scratch_only:
        raise MlexpError("--pretrained-only and --scratch-only exclude each other")
    inits = ["pretrained"] if pretrained_only else ["scratch"] if scratch_only else axes["inits"]
    for init in inits:
        if init not in INITS:
            raise MlexpError(f"--inits takes {', '.join(INITS)}, got {init!r}")
    for name in ("backbones", "strategies", "seeds"):
        if not axes[name]:
            raise MlexpError(f"--{name} needs at least one value")
    seeds = [parse_value("seeds", int, seed) for seed in axes["seeds"]]
    counts = {name: parse_value(name, int, launch[name]) if launch[name] else None
              for name in ("parallel", "gpus_per_run", "cpus_per_run")}
    make_executor = executor_factory(launch, counts)
    base = build_config(values, world_size=max(counts["gpus_per_run"] or 1, 1))  # a child's DDP processes
    for strategy in axes["strategies"]:
        base.replace(strategy=strategy)  # validates the name
    # What each child gets: the training options as typed (the sweep's own run name is its parent's)
    train_options = {name: value for name, value in user_values(values).items() if name != "run_name"}
    result = run_sweep(base, axes["backbones"], inits, axes["strategies"], seeds, train_options, make_executor,
                       retry_failed=parse_value("retry_failed", bool, launch["retry_failed"] or "false"),
                       parent_run_id=parent_run_id)
    if result.failed or result.killed:
        what = f"{len(result.failed)} configuration(s) FAILED" if result.failed else "some configurations were KILLED"
        click.echo(f"mlexp: {what}; see the runs' mlexp.error tag, or run the sweep again", err=True)
        sys.exit(1)


LAUNCH_OPTIONS = ("parallel", "gpus_per_run", "cpus_per_run", "executor", "ray_address", "retry_failed")


def executor_factory(launch: dict[str, str], counts: dict[str, int | None]):
    """Check the launch options now (a bad value fails before anything starts); the executor
    itself is made once the plan is printed."""
    executor = launch["executor"] or "local"
    if executor not in ("local", "ray"):
        raise MlexpError(f"--executor must be local or ray, got {executor!r}")
    if launch["ray_address"] and executor != "ray":
        raise MlexpError("--ray-address needs --executor ray")
    from mlexp.sweep.local_executor import check_counts

    check_counts(**counts)
    if executor == "ray":
        from mlexp.sweep.ray_executor import RayExecutor, import_ray

        import_ray()  # not installed: one line now
        return lambda: RayExecutor(launch["ray_address"] or None, **counts)
    from mlexp.sweep.local_executor import make_local_executor

    return lambda: make_local_executor(**counts)


def split_names(values) -> list[str]:
    """Repeated options and comma-separated values (the MLproject passes one string) -> names."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


@cli.command("compare", context_settings=CONTEXT)
@click.option("--experiment", "experiment", multiple=True, metavar="NAME",
              help="Experiment to compare (name or id); repeat it or separate names with commas.")
@click.option("--filter", "filter", default="", metavar="TEXT",
              help="MLflow search filter, e.g. \"params.lr = '0.001' and tags.`mlexp.dataset` = 'digits'\".")
@click.option("--group-by", "group_by", default="backbone,strategy", metavar="NAMES",
              help="Comma-separated: backbone (named as in the sweep summary: resnet18_scratch), arch "
                   "(resnet18: both inits), init, strategy, dataset, experiment, any param (lr, epochs, ...) "
                   "or tags.X / params.X. (default: backbone,strategy)")
@click.option("--metric", "metric", default="", metavar="KEY",
              help="What the paired comparisons compare: any metric key of the runs. (default: test/acc when every run has "
                   "a test split, else best/val_acc, which is optimistically biased)")
@click.option("--equal-budget", "equal_budget", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Compare each pair at the epoch its shorter run stopped (from the val/acc curves), when the "
                   "two sides trained for different numbers of epochs. (default: false)")
@click.option("--between-backbones", "between_backbones", is_flag=False, flag_value="true", default="false",
              metavar="[BOOL]", help="Also compare the architectures with each other, per init and strategy, "
                                     "paired on seed and fold. (default: false)")
@click.option("--features", "features", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Load each backbone's paired pretrained and scratch models and compare their representations "
                   "layer by layer on the validation images (linear CKA heatmaps). (default: false)")
@click.option("--out", "out", default="mlexp-compare", metavar="DIR",
              help="Folder for report.md, groups.csv/.md, comparisons.csv, pairs.csv, runs.csv, compare.json, "
                   "the plots and features/. (default: mlexp-compare)")
@click.option("--log-run", "log_run", is_flag=False, flag_value="true", default="true", metavar="[BOOL]",
              help="Log the outputs to an MLflow run (under `mlflow run`: the project's run). (default: true)")
@click.option("--compare-experiment", "compare_experiment", default="", metavar="NAME",
              help="Experiment for that run when not under `mlflow run`. (default: the compared "
                   "experiment's name + \"-compare\", e.g. digits-compare)")
@tracking_uri_option
def compare_command(**values: Any) -> None:
    """Compare finished runs: does pretraining help, which strategy wins, at what cost.

    Pairs runs on seed and fold, reports each difference with a 95% bootstrap interval, a
    permutation p-value (Holm-adjusted) and P(A beats B), and answers the research questions
    in words in report.md.

    \b
    Examples:
      mlexp compare --experiment digits-sweep
      mlexp compare --experiment digits-sweep --features --metric test/acc
      mlexp compare --experiment a b --group-by arch init --out report/
      mlexp compare --experiment digits-sweep --filter "params.epochs = '10'" --group-by strategy,lr
    """
    compare_with(values)


def compare_with(values: dict[str, Any], run_id: str | None = None) -> None:
    """Compare as the options say; `run_id`: log the outputs into that existing run."""
    from mlexp.analysis.compare import format_table, run_compare
    from mlexp.config import parse_value

    out = values["out"] or "mlexp-compare"
    result = run_compare(values["tracking_uri"] or None, split_names(values["experiment"]) or ["mlexp"],
                         values["filter"] or None, split_names([values["group_by"]]) or None, Path(out),
                         compare_experiment=values["compare_experiment"] or None,
                         log_run=parse_value("log_run", bool, values["log_run"] or "true"), run_id=run_id,
                         metric=values["metric"] or None,
                         **{name: parse_value(name, bool, values[name] or "false")
                            for name in ("equal_budget", "between_backbones", "features")})
    click.echo(format_table(result))
    click.echo(f"Wrote {len(result.files)} files to {out}/ (the research questions answered: {out}/report.md)"
               + (f"; logged to MLflow run {result.run_id}" if result.run_id else ""))


@cli.command("evaluate", context_settings=CONTEXT)
@click.option("--model", "model", default="", metavar="URI",
              help="The model: runs:/RUN_ID (its best-on-validation model; runs:/RUN_ID/final for the last "
                   "epoch's), models:/NAME@ALIAS, models:/NAME/VERSION or models:/MODEL_ID.")
@click.option("--data", "data", default="", metavar="FOLDER",
              help="An image folder with one sub-folder per class, the same classes the model was trained on.")
@click.option("--experiment", "experiment", default="mlexp-evaluate", metavar="NAME",
              help="Experiment for the evaluation run (ignored under `mlflow run`). (default: mlexp-evaluate)")
@click.option("--run-name", "run_name", default="", metavar="TEXT",
              help="Name of the evaluation run. (default: evaluate-MODEL-FOLDER)")
@tracking_uri_option
def evaluate_command(**values: Any) -> None:
    """Evaluate a trained model on an image folder, with the transforms it was trained with.

    Logs an evaluation run linked to the model: test/acc, test/loss, test/top5, test/balanced_acc,
    test/macro_f1, and under evaluation/test/ the per-class table, the confusion matrix (CSV and
    PNG) and every image's prediction (predictions.csv).

    \b
    Examples:
      mlexp evaluate --model models:/digits-classifier@champion --data /data/digits/test
      mlexp evaluate --model runs:/RUN_ID --data /data/new-photos
    """
    evaluate_with(values)


def evaluate_with(values: dict[str, Any], run_id: str | None = None) -> None:
    from mlexp.commands.models import evaluate_model

    if not values["model"] or not values["data"]:
        raise MlexpError("say what to evaluate on what: --model URI --data FOLDER")
    evaluate_model(values["model"], values["data"], values["tracking_uri"] or None,
                   values["experiment"] or "mlexp-evaluate", values["run_name"] or None, run_id=run_id, echo=click.echo)


@cli.command("register", context_settings=CONTEXT)
@click.option("--name", "name", default="", metavar="NAME", help="The registered model's name.")
@click.option("--experiment", "experiment", multiple=True, metavar="NAME",
              help="Register the best model of these experiments (repeat or comma-separate). (default: mlexp)")
@click.option("--metric", "metric", default="val/acc", metavar="KEY",
              help="How 'best' is chosen: a validation metric of the runs' best models (lower wins for a loss). "
                   "(default: val/acc)")
@click.option("--model", "model", default="", metavar="URI",
              help="Register this model instead (runs:/RUN_ID, models:/MODEL_ID, ...).")
@click.option("--alias", "alias", default="champion", metavar="ALIAS",
              help="The alias to point at the new version (it moves when you register again). (default: champion)")
@tracking_uri_option
def register_command(**values: Any) -> None:
    """Register the best run's best model under a name, and point an alias at it.

    Then `mlflow models serve -m models:/NAME@champion --env-manager local` serves it,
    `mlexp evaluate --model models:/NAME@champion` evaluates it, and `mlexp train --weights
    models:/NAME@champion` fine-tunes from it.

    \b
    Examples:
      mlexp register --name digits-classifier --experiment digits-sweep
      mlexp register --name digits-classifier --model runs:/RUN_ID --alias challenger
    """
    from mlexp.commands.models import register_best

    if not values["name"]:
        raise MlexpError("say under which name: --name NAME")
    register_best(values["name"], split_names(values["experiment"]) or ["mlexp"], values["tracking_uri"] or None,
                  values["metric"] or "val/acc", values["alias"] or "champion", values["model"] or None,
                  echo=click.echo)


@cli.command("monitor", context_settings=CONTEXT)
@click.option("--progress", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Runs still training: epoch of total, val acc, epoch time, ETA (the default).")
@click.option("--summary", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Finished runs per experiment, best first.")
@click.option("--experiment", "experiment", multiple=True, metavar="NAME",
              help="Only these experiments (repeat or comma-separate; default: all).")
@click.option("--watch", type=float, default=0.0, metavar="SECONDS", help="Refresh every SECONDS until Ctrl-C.")
@tracking_uri_option
def monitor_command(**values: Any) -> None:
    """Training monitor: progress of running runs, summary of finished ones (plots: `mlexp compare`).

    \b
    Examples:
      mlexp monitor --progress --watch 30
      mlexp monitor --summary --experiment digits-sweep
    """
    monitor_with(values)


def monitor_with(values: dict[str, Any]) -> None:
    from mlexp.analysis import monitor
    from mlexp.config import parse_value
    from mlexp.tracking import check_reachable, default_tracking_uri

    uri = values["tracking_uri"] or default_tracking_uri()
    check_reachable(uri)
    views = [monitor.progress] if parse_value("progress", bool, values["progress"] or "false") else []
    views += [monitor.summary] if parse_value("summary", bool, values["summary"] or "false") else []
    watch = float(values["watch"] or 0)
    while True:
        for show in views or [monitor.progress]:
            click.echo(show(uri, split_names(values["experiment"]) or None))
        if watch <= 0:
            return
        time.sleep(watch)
        click.echo()


@cli.command("sync", context_settings=CONTEXT)
@click.option("--run", "run", default="", metavar="RUN_ID", help="The run whose outbox to send (its MLflow run "
              "id, or an offline run's id).")
@click.option("--all", "every", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Every outbox on this machine (parents before their children).")
@click.option("--to", "to", default="", metavar="URI", help="Tracking URI for offline runs (others go back to "
              "the server they came from).")
@click.option("--dry-run", "dry_run", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="Say what waits, and its size on disk; send nothing.")
def sync_command(run, every, to, dry_run) -> None:
    """Send what outboxes still hold: runs killed or ended during an outage, and offline runs.

    Every run writes everything to a local outbox first ($MLEXP_OUTBOX_DIR, default
    ~/.local/share/mlexp/outbox) and sends it from there. What a process could not send
    before it ended waits there until `mlexp sync`. Safe to repeat: nothing is sent twice.

    \b
    Examples:
      mlexp sync --all --dry-run
      mlexp sync --run 3f2a...            (a run that ended while the server was away)
      mlexp sync --all --to http://mlflow.example:5000    (runs recorded with --offline)
    """
    from mlexp.config import parse_value
    from mlexp.tracking.sync import sync

    results = sync(run or None, parse_value("all", bool, every), to or None, parse_value("dry_run", bool, dry_run),
                   echo=click.echo)
    if any(result.after is not None and not result.complete for result in results):
        sys.exit(1)


@cli.command("reap", context_settings=CONTEXT)
@click.option("--experiment", "experiment", multiple=True, metavar="NAME",
              help="Only these experiments (repeat or comma-separate; default: all).")
@click.option("--dry-run", "dry_run", is_flag=False, flag_value="true", default="false", metavar="[BOOL]",
              help="List the lost runs; change nothing.")
@tracking_uri_option
def reap_command(experiment, dry_run, tracking_uri) -> None:
    """Mark lost runs FAILED: RUNNING runs whose heartbeat stopped (killed process, lost machine).

    A live run beats every 30 s ($MLEXP_HEARTBEAT_S); one silent for 1.5 periods is lost.
    Each reaped run gets `mlexp.error` saying why, and can still be resumed with
    `mlexp train --resume RUN_ID`.
    """
    from mlexp.analysis import monitor
    from mlexp.config import parse_value
    from mlexp.tracking import check_reachable, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    check_reachable(uri)
    lines = monitor.reap(uri, split_names(experiment) or None, parse_value("dry_run", bool, dry_run))
    click.echo("\n".join(lines) if lines else "No lost runs.")


@cli.command(context_settings=CONTEXT)
def backbones() -> None:
    """List the backbone catalogue: names, timm models, init, size, weight sources."""
    from mlexp.models.catalogue import catalogue_rows

    print_table(catalogue_rows())


@cli.command(context_settings=CONTEXT)
def recipes() -> None:
    """List the recipe presets usable with --recipe."""
    from mlexp.training.recipes import preset_rows

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
    with user_errors():
        cli.main(args=join_list_options(sys.argv[1:] if argv is None else argv), prog_name="mlexp",
                 standalone_mode=False)
