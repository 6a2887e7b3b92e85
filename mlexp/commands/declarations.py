"""Every command's own options, declared once (training's are `TrainConfig`'s).

A declaration is a frozen dataclass whose fields carry their default, help text, metavar and
choices. `commands.options.declared_options` turns one into click options (the help shows
the default, taken from the field), the MLproject renders its parameters from the same
fields, and `parse_options` turns what the user typed into the typed declaration: a value
left empty (`--out ""`, an MLproject parameter left at "") takes the field's default, so no
default is restated anywhere else.

A list option (`list_option`) takes comma-separated values or a JSON list (a name with a
comma in it: `--experiment '["lr=0.1, wd=0"]'`), is repeatable where it names experiments,
and is parsed into a tuple; a repeated option (`repeated_option`) keeps each
value whole (`--pair 'init=pretrained,strategy=linear vs init=scratch,strategy=full'`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlexp.config import DEFAULT_EXPERIMENT


def declared(default, help: str, metavar: str = "TEXT", choices: tuple[str, ...] | None = None):
    """A command option: its default, help text, metavar and allowed values."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": choices})


def list_option(default: tuple[str, ...], help: str, metavar: str = "NAMES", repeatable: bool = False):
    """A comma-separated list (repeatable: the option may also be given several times)."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": None, "list": True,
                                            "repeatable": repeatable})


def repeated_option(help: str, metavar: str):
    """An option that may be given several times, each value kept whole (its commas are its own)."""
    return field(default=(), metadata={"help": help, "metavar": metavar, "choices": None, "repeatable": True})


def flag(default: bool, help: str):
    """`--name` alone means true; `--name false` is accepted too (how MLproject passes it)."""
    return field(default=default, metadata={"help": help, "metavar": "[BOOL]", "choices": None})


TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."


@dataclass(frozen=True)
class LaunchOptions:
    """Where trainings run and how many at once: a sweep's children, a study's workers."""

    parallel: int | None = declared(None, "Trainings at once (a sweep's children, a study's workers). (default: "
                                    "a sweep: one per GPU (GPUs // --gpus-per-run), 1 on CPU, where N of them share "
                                    "the cores, cores // N threads each; a study: 1, in its own process; with Ray: "
                                    "the cluster's room)", "N")
    gpus_per_run: int | None = declared(None, "GPUs per training; K > 1 trains each sweep child as a K-process DDP "
                                        "run (torchrun). (default: 1 on a GPU machine, 0 on CPU)", "K")
    cpus_per_run: int | None = declared(None, "CPU cores (threads) per training. (default: cores // N here; 1 per "
                                        "Ray task)", "C")
    executor: str = declared("local", "local: on this machine; ray: Ray tasks over a Ray cluster "
                             "(pip install 'mlexp[ray]').", "[local|ray]", ("local", "ray"))
    ray_address: str | None = declared(None, "The Ray cluster to use (`ray start --head` prints it). (default: a "
                                       "new local Ray instance)", "auto|HOST:PORT")


@dataclass(frozen=True)
class SweepOptions(LaunchOptions):
    """`mlexp sweep`'s own options; every other option is a training option for each child."""

    backbones: tuple[str, ...] = list_option(("resnet18",), "Comma-separated backbones; a plain name (resnet50) "
                                             "expands to both inits.")
    inits: tuple[str, ...] = list_option(("pretrained", "scratch"), "Comma-separated inits to try.")
    pretrained_only: bool = flag(False, "Only the pretrained flavour of each backbone.")
    scratch_only: bool = flag(False, "Only the scratch flavour of each backbone.")
    strategies: tuple[str, ...] = list_option(("full",), "Comma-separated: full, linear, gradual.")
    seeds: tuple[str, ...] = list_option(("42",), "Comma-separated seeds.")
    folds: str | None = declared(None, "Data with a split of its own (DATA/labels/trainN.txt, --splits, "
                                 "torchvision:DTD): which of its folds to train, e.g. 1-10, 1,3,5 or 2 (default: "
                                 "all). Other data: K stratified folds of one pool, each trained. (default: no "
                                 "folds, one --val-split)", "FOLDS")
    fold: str | None = declared(None, "With --folds K: train only these of its folds (0-based), e.g. 0,2 or 0-2.",
                                "FOLDS")
    strategy_epochs: tuple[str, ...] = list_option((), "Epochs per strategy, comma-separated NAME=N (e.g. "
                                                   "linear=15,full=30): replaces --epochs for that strategy's runs, "
                                                   "before the scratch multipliers.", "NAME=N")
    strategy_lr: tuple[str, ...] = list_option((), "Learning rate per strategy, comma-separated NAME=LR (e.g. "
                                               "linear=0.01,full=0.001): replaces --lr for that strategy's runs, "
                                               "before the scratch multipliers.", "NAME=LR")
    init_epochs: tuple[str, ...] = list_option((), "Epochs per init, comma-separated NAME=N (e.g. scratch=20): "
                                               "what that init's runs train for (no multiplier applied; it wins "
                                               "over --strategy-epochs).", "NAME=N")
    init_lr: tuple[str, ...] = list_option((), "Learning rate per init, comma-separated NAME=LR (e.g. "
                                           "scratch=0.002): what that init's runs train with (no multiplier "
                                           "applied; it wins over --strategy-lr).", "NAME=LR")
    retry_failed: bool = flag(False, "Train again the configurations that FAILED in an earlier run of this sweep "
                                     "(each resumes its run from its last checkpoint).")


@dataclass(frozen=True)
class TuneOptions(LaunchOptions):
    """`mlexp tune`'s own options; every other option is a training option for each trial."""

    backbones: tuple[str, ...] = list_option(("resnet18",), "Comma-separated backbones; a plain name (resnet50) "
                                             "expands to both inits.")
    inits: tuple[str, ...] = list_option(("pretrained", "scratch"), "Comma-separated inits: each an arm.")
    strategies: tuple[str, ...] = list_option(("full",), "Comma-separated strategies: each an arm.")
    space: str | None = declared(None, "The search space, declared once for every arm: NAME=LOW:HIGH[:log][:int] "
                                 "or NAME=A,B,... (e.g. 'lr=1e-5:1e-1:log,weight_decay=0:0.1,warmup_epochs=0:5:int,"
                                 "label_smoothing=0,0.1'); each NAME a training option.", "SPACE")
    sampler: str = declared("tpe", "How trials are proposed (Optuna's samplers, seeded by --search-seed).",
                            "[tpe|random|qmc|grid]", ("tpe", "random", "qmc", "grid"))
    search_seed: int = declared(0, "The samplers' seed: the same seed proposes the same trials.", "N")
    trials: int = declared(10, "Trials per arm: every arm gets this many, each --epochs long.", "N")
    pruner: str = declared("median", "Stops hopeless trials after an epoch (Optuna's pruners, on the validation "
                           "metric --best-metric names).", "[median|asha|hyperband|none]",
                           ("median", "asha", "hyperband", "none"))
    final_seeds: tuple[str, ...] = list_option(("1", "2", "3"), "Seeds the best trial of each arm is retrained "
                                               "with (the same seeds for every arm: paired), then compared.",
                                               "SEEDS")
    storage: str | None = declared(None, "Where the studies live: an Optuna database URL (a team's "
                                   "postgresql://...). (default: a journal file under mlexp-output/tune/)", "URL")


@dataclass(frozen=True)
class CompareOptions:
    experiment: tuple[str, ...] = list_option((DEFAULT_EXPERIMENT,), "Experiment to compare (name or id); repeat "
                                              "it or separate names with commas (a name with commas: a JSON "
                                              "list, '[\"a, b\"]').", "NAME", repeatable=True)
    filter: str | None = declared(None, "MLflow search filter, e.g. \"params.lr = '0.001' and "
                                  "tags.`mlexp.dataset` = 'digits'\".")
    group_by: tuple[str, ...] = list_option(("backbone", "strategy"), "Comma-separated: backbone (named as in "
                                            "the sweep summary: resnet18_scratch), arch (resnet18: both inits), "
                                            "init, strategy, dataset, experiment, any param (lr, epochs, ...) "
                                            "or tags.X / params.X.")
    metric: str | None = declared(None, "What the paired comparisons compare: any metric key of the runs. "
                                  "(default: test/acc when every run has a test split, else the runs' own best "
                                  "metric, best/<--best-metric> in the direction of their --best-mode: "
                                  "best/val_acc unless they chose another; optimistically biased; runs that chose "
                                  "different ones, or logged no best/* of theirs, are compared on best/val_acc, and "
                                  "the report says so)", "KEY")
    pair: tuple[str, ...] = repeated_option("Compare two arms head to head: 'A vs B', each arm KEY=VALUE[,...] "
                                            "over init, strategy, backbone, arch, dataset or any param (e.g. "
                                            "'init=pretrained,strategy=linear vs init=scratch,strategy=full'), "
                                            "paired on dataset, architecture, seed and fold. Repeat it, or separate "
                                            "pairs with ';'.", "'A vs B'")
    equal_budget: bool = flag(False, "Compare each pair at the epoch its shorter run stopped (from the val/acc "
                                     "curves), when the two sides trained for different numbers of epochs.")
    between_backbones: bool = flag(False, "Also compare the architectures with each other, per init and "
                                          "strategy, paired on seed and fold.")
    features: bool = flag(False, "Load each backbone's paired pretrained and scratch models and compare their "
                                 "representations layer by layer on the validation images (linear CKA heatmaps).")
    out: str = declared("mlexp-compare", "Folder for report.md, groups.csv/.md, comparisons.csv, pairs.csv, "
                        "runs.csv, compare.json, the plots and features/.", "DIR")
    log_run: bool = flag(True, "Log the outputs to an MLflow run (under `mlflow run`: the project's run).")
    compare_experiment: str | None = declared(None, "Experiment for that run when not under `mlflow run`. "
                                              "(default: the compared experiment's name + \"-compare\", e.g. "
                                              "digits-compare)", "NAME")
    tracking_uri: str | None = declared(None, TRACKING_URI_HELP)


@dataclass(frozen=True)
class EvaluateOptions:
    model: str | None = declared(None, "The model: runs:/RUN_ID (its best-on-validation model; runs:/RUN_ID/final "
                                 "for the last epoch's), models:/NAME@ALIAS, models:/NAME/VERSION or "
                                 "models:/MODEL_ID.", "URI")
    data: str | None = declared(None, "An image folder with one sub-folder per class, the same classes the model "
                                "was trained on; for a detector, a COCO (annotations.json) or YOLO (images/ and "
                                "labels/) folder of its classes.", "FOLDER")
    experiment: str = declared(f"{DEFAULT_EXPERIMENT}-evaluate", "Experiment for the evaluation run (ignored "
                               "under `mlflow run`).", "NAME")
    run_name: str | None = declared(None, "Name of the evaluation run. (default: evaluate-MODEL-FOLDER)")
    tracking_uri: str | None = declared(None, TRACKING_URI_HELP)


@dataclass(frozen=True)
class RegisterOptions:
    name: str | None = declared(None, "The registered model's name.", "NAME")
    experiment: tuple[str, ...] = list_option((DEFAULT_EXPERIMENT,), "Register the best model of these "
                                              "experiments (repeat or comma-separate).", "NAME", repeatable=True)
    metric: str | None = declared(None, "How 'best' is chosen: a validation metric of the runs' best models "
                                  "(lower wins for a loss). (default: the metric each run chose its best epoch "
                                  "by, --best-metric, in the direction of its --best-mode; runs that chose by "
                                  "different metrics need --metric)", "KEY")
    model: str | None = declared(None, "Register this model instead (runs:/RUN_ID, models:/MODEL_ID, ...).", "URI")
    alias: str = declared("champion", "The alias to point at the new version (it moves when you register again).",
                          "ALIAS")
    tracking_uri: str | None = declared(None, TRACKING_URI_HELP)


@dataclass(frozen=True)
class MonitorOptions:
    progress: bool = flag(False, "Runs still training: epoch of total, val acc, epoch time, ETA (the default).")
    summary: bool = flag(False, "Finished runs per experiment, best first.")
    experiment: tuple[str, ...] = list_option((), "Only these experiments (repeat or comma-separate; default: "
                                              "all).", "NAME", repeatable=True)
    watch: float = declared(0.0, "Refresh every SECONDS until Ctrl-C.", "SECONDS")
    tracking_uri: str | None = declared(None, TRACKING_URI_HELP)


@dataclass(frozen=True)
class SyncOptions:
    run: str | None = declared(None, "The run whose outbox to send (its MLflow run id, or an offline run's id).",
                               "RUN_ID")
    all: bool = flag(False, "Every outbox on this machine (parents before their children).")
    to: str | None = declared(None, "Tracking URI for offline runs (others go back to the server they came "
                              "from).", "URI")
    dry_run: bool = flag(False, "Check every outbox and say what waits, its size on disk, what was refused and "
                                "which are damaged; send and move nothing.")
    verbose: bool = flag(False, "Show the sender's own lines while it sends (each failure, each recovery).")


@dataclass(frozen=True)
class ReapOptions:
    experiment: tuple[str, ...] = list_option((), "Only these experiments (repeat or comma-separate; default: "
                                              "all).", "NAME", repeatable=True)
    dry_run: bool = flag(False, "List the lost runs; change nothing.")
    tracking_uri: str | None = declared(None, TRACKING_URI_HELP)


# Each command's declaration, by the command's name (the MLproject renders its parameters from these).
BY_COMMAND = {"sweep": SweepOptions, "tune": TuneOptions, "compare": CompareOptions, "evaluate": EvaluateOptions,
              "register": RegisterOptions, "monitor": MonitorOptions, "sync": SyncOptions, "reap": ReapOptions}
