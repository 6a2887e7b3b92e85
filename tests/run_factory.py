"""Real MLflow runs shaped like mlexp training runs, for the compare and monitor tests."""

from __future__ import annotations

import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from mlexp.config import TrainConfig
from mlexp.models.catalogue import resolve_backbone


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def log_run(client: MlflowClient, experiment: str, *, backbone: str = "resnet18", init: str = "pretrained",
            strategy: str = "full", seed: int = 1, fold: int = 0, val_acc: list[float] = (0.5, 0.7),
            train_acc: list[float] | None = None, epoch_time: float = 10.0, epochs: int | None = None,
            trainable: int = 1000, status: str = "FINISHED", dataset: str = "digits",
            name: str | None = None, start_time: int | None = None, heartbeat: int | None = None,
            tags: dict[str, str] | None = None, best_metric: str | None = "val/acc", best_mode: str = "auto") -> str:
    """One run with the logging contract: effective params (the backbone by its catalogue name,
    as training logs it), mlexp tags, per-epoch metrics and, once finished, the end-of-run
    summary. Statuses other than RUNNING end the run. `tags`: more tags (mlflow.parentRunId...).
    `best_metric`/`best_mode`: what chose the best epoch (best/<metric> and best/epoch follow);
    None: a run from before --best-metric, without those params."""
    train_acc = list(train_acc) if train_acc is not None else [min(1.0, v + 0.05) for v in val_acc]
    cfg = TrainConfig(backbone=resolve_backbone(backbone, init).name, init=init, strategy=strategy, seed=seed,
                      folds=3, fold=fold, epochs=epochs or len(val_acc), best_metric=best_metric or "val/acc",
                      best_mode=best_mode)
    params = cfg.to_params() | {"distributed_type": "NO", "num_processes": "1"}
    if best_metric is None:
        params = {name: value for name, value in params.items() if name not in ("best_metric", "best_mode")}
    tags = {"mlexp.backbone": backbone, "mlexp.init": init, "mlexp.strategy": strategy, "mlexp.dataset": dataset,
            "mlexp.version": "0.1.0", **({"mlexp.heartbeat": str(heartbeat)} if heartbeat else {}), **(tags or {})}
    run = client.create_run(experiment_id(client, experiment), start_time=start_time,
                            run_name=name or f"{backbone}-{init}-{strategy}-s{seed}-f{fold}", tags=tags)
    now = int(time.time() * 1000)
    metrics = [Metric("model/params_total", 5000.0, now, 0)]
    for epoch, (val, train) in enumerate(zip(val_acc, train_acc), start=1):
        values = {"train/loss": 1 - train, "train/loss_total": 10 * (1 - train), "train/acc": train,
                  "val/loss": 1.5 * (1 - val), "val/acc": val, "epoch/time_s": epoch_time, "epoch/lr": 0.001,
                  "train/trainable_params": trainable, "train/phase": 0}
        metrics += [Metric(key, float(value), now + epoch, epoch) for key, value in values.items()]
    if status == "FINISHED" and val_acc:
        best = max(val_acc)
        final = {"best/val_acc": best, "best/epoch": val_acc.index(best) + 1,
                 "time/total_s": epoch_time * len(val_acc), "model/params_trainable": trainable}
        if best_metric == "val/loss":  # chosen by the lowest val/loss (1.5 (1 - val/acc)): the same epoch
            final["best/val_loss"] = 1.5 * (1 - best)
        metrics += [Metric(key, float(value), now + 100, len(val_acc)) for key, value in final.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag("mlflow.source.type", "LOCAL")])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id
