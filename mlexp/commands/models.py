"""The model commands: `evaluate` a logged model on a folder, `register` the best one under a name.
(The work itself, which needs torch, is `commands.model_runs`, imported when a command runs.)"""

from __future__ import annotations

from typing import Any

import click

from mlexp.commands.declarations import EvaluateOptions, RegisterOptions
from mlexp.commands.options import CONTEXT, declared_options, parse_options
from mlexp.errors import MlexpError


@click.command("evaluate", context_settings=CONTEXT)
@declared_options(EvaluateOptions)
def evaluate_command(**values: Any) -> None:
    """Evaluate a trained model on an image folder, with the transforms it was trained with.

    Logs an evaluation run linked to the model: test/acc, test/loss, test/top5, test/balanced_acc,
    test/macro_f1, and under evaluation/test/ the per-class table, the confusion matrix (CSV and
    PNG) and every image's prediction (predictions.csv). A detector (a run of --task detection)
    is scored on a COCO or YOLO folder: test/map, test/map_50, test/map_75 and each class's AP
    (evaluation/test/per_class_ap.csv).

    \b
    Examples:
      mlexp evaluate --model models:/digits-classifier@champion --data /data/digits/test
      mlexp evaluate --model runs:/RUN_ID --data /data/new-photos
    """
    evaluate_with(values)


def evaluate_with(values: dict[str, Any], run_id: str | None = None) -> None:
    from mlexp.commands.model_runs import evaluate_model  # here: it loads torch

    own = parse_options(EvaluateOptions, values)
    if not own.model or not own.data:
        raise MlexpError("say what to evaluate on what: --model URI --data FOLDER")
    evaluate_model(own.model, own.data, own.tracking_uri, own.experiment, own.run_name, run_id=run_id,
                   echo=click.echo)


@click.command("register", context_settings=CONTEXT)
@declared_options(RegisterOptions)
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
    from mlexp.commands.model_runs import register_best  # here: it loads torch

    own = parse_options(RegisterOptions, values)
    if not own.name:
        raise MlexpError("say under which name: --name NAME")
    register_best(own.name, list(own.experiment), own.tracking_uri, own.metric, own.alias, own.model,
                  echo=click.echo)
