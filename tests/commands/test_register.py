"""register chooses the best model by each run's own best metric and mode (its `best` weights
are its best epoch by them), or by --metric; runs that chose by different metrics need --metric."""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric

from mlexp.commands.model_runs import best_model
from mlexp.errors import MlexpError
from mlexp.training.logged_models import MODEL_TAG, MODEL_TYPE
from tests.commands.test_user_errors import assert_one_line_error, run_cli
from tests.run_factory import experiment_id


def best_logged_model(client: MlflowClient, experiment: str, values: dict[str, float],
                      best_metric: str | None = "val/acc", best_mode: str = "auto") -> str:
    """A finished run's READY `best` model, linked to its best epoch's metrics as training links
    them (plus best/<metric>); best_metric None: a model from before --best-metric."""
    run = client.create_run(experiment_id(client, experiment)).info.run_id
    params = {"best_metric": best_metric, "best_mode": best_mode} if best_metric else {}
    model = client.create_logged_model(experiment_id(client, experiment), name="best", source_run_id=run,
                                       tags={MODEL_TAG: MODEL_TYPE}, params=params)
    now = int(time.time() * 1000)
    client.log_batch(run, metrics=[Metric(key, value, now, 3, model_id=model.model_id, run_id=run)
                                   for key, value in values.items()])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.set_terminated(run)
    return model.model_id


def test_the_best_model_by_each_run_s_own_metric(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    lowest = best_logged_model(client, "loss", {"val/loss": 0.20, "val/acc": 0.90, "best/val_loss": 0.20},
                               best_metric="val/loss")
    accurate = best_logged_model(client, "loss", {"val/loss": 0.30, "val/acc": 0.95, "best/val_loss": 0.30},
                                 best_metric="val/loss")
    assert best_model(client, ["loss"], None)[0].model_id == lowest  # its runs' own metric: the lowest loss
    model, key = best_model(client, ["loss"], "val/acc")
    assert (model.model_id, key) == (accurate, "val/acc")  # --metric val/acc: the highest accuracy

    older = best_logged_model(client, "older", {"val/loss": 0.40, "val/acc": 0.93, "best/val_acc": 0.93},
                              best_metric=None)  # from before --best-metric: val/acc, higher wins
    best_logged_model(client, "older", {"val/loss": 0.10, "val/acc": 0.91, "best/val_acc": 0.91}, best_metric=None)
    assert best_model(client, ["older"], None)[0].model_id == older


def test_runs_that_chose_by_different_metrics_need_metric(sqlite_uri, capsys):
    client = MlflowClient(sqlite_uri)
    for loss, acc in ((0.2, 0.9), (0.3, 0.95)):
        best_logged_model(client, "loss", {"val/loss": loss, "val/acc": acc, "best/val_loss": loss},
                          best_metric="val/loss")
        best_logged_model(client, "acc", {"val/loss": loss, "val/acc": acc, "best/val_acc": acc})
    best_logged_model(client, "max-loss", {"val/loss": 0.5, "val/acc": 0.97}, best_metric="val/loss", best_mode="max")
    with pytest.raises(MlexpError, match=r"\(val/acc \(max\): 2 run\(s\), val/loss \(min\): 2 run\(s\)\).*--metric"):
        best_model(client, ["loss", "acc"], None)
    with pytest.raises(MlexpError, match=r"val/loss \(min\): 2 run\(s\), val/loss \(max\): 1 run\(s\)"):
        best_model(client, ["loss", "max-loss"], None)  # one metric, two directions: not one scale either
    assert best_model(client, ["loss", "acc", "max-loss"], "val/acc")[0].metrics  # --metric ranks them all
    capsys.readouterr()  # what creating the store logged
    code, err = run_cli(["register", "--name", "x", "--experiment", "loss,acc"], capsys)
    assert_one_line_error(code, err, "chose their best epochs by different metrics", "--metric KEY")
