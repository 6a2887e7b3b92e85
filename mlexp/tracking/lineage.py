"""What a run used and made, as MLflow records them: its splits as dataset inputs (described
by `mlexp.data.digests`: name, source, digest of exactly which images, size), its logged
models as outputs at their steps, and the metric points that link the two."""

# Imported where used: `mlflow` (about 1.4 s), because `mlexp --help`, the option checks and
# their one-line errors import this module and come before it.
from __future__ import annotations

import json
import time
from pathlib import Path

from mlexp.faults import crash_point
from mlexp.tracking.server import MAX_METRICS_PER_REQUEST

# Which split a metric was measured on, by its prefix (train/loss, val/acc, test/macro_f1).
SPLIT_OF_PREFIX = {"train": "train", "val": "val", "test": "test", "best": "val"}


def mlflow_inputs(splits: list[dict]) -> list:
    """The splits as MLflow DatasetInputs (what `log_inputs` takes)."""
    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split in splits:
        profile = json.dumps({"num_images": split["num_images"], "num_classes": split["num_classes"]})
        dataset = MlflowDataset(name=split["name"], digest=split["digest"], source_type="local",
                                source=json.dumps({"uri": split["source"]}), profile=profile)
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split["context"])]))
    return inputs


def split_of(metric_key: str) -> str | None:
    """The split a metric was measured on (val/acc -> val), or None (time/epoch_s)."""
    return SPLIT_OF_PREFIX.get(metric_key.split("/", 1)[0])


def log_inputs(client, run_id: str, splits: list[dict], model_ids: list[str]) -> None:
    """The run's splits as dataset inputs, and the logged models it used as model inputs (MLflow
    keeps one of each per name and digest, or model: a retry adds none)."""
    from mlflow.entities import LoggedModelInput

    inputs = mlflow_inputs(splits)
    models = [LoggedModelInput(m) for m in model_ids] or None
    for attempt in range(INPUT_RACE_RETRIES):
        try:
            client.log_inputs(run_id, datasets=inputs, models=models)
            return
        except Exception as error:
            # MLflow's SQL store inserts a dataset after looking for it: two runs of one experiment
            # logging the same split at once (a parallel sweep) can both miss it, and the second
            # insert fails on the unique key. The dataset exists now, so trying again succeeds.
            if not is_unique_key_race(error) or attempt == INPUT_RACE_RETRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


INPUT_RACE_RETRIES = 5


def is_unique_key_race(error: BaseException) -> bool:
    text = str(error)
    return "UNIQUE constraint failed" in text or "duplicate key value violates unique constraint" in text


def publish_logged_model(client, run_id: str, local_dir: Path, meta: dict) -> str:
    """A saved MLflow model folder as a logged model of the run, at its step: linked to the run
    (as its output at that step), to that step's metrics and through them to the datasets they
    were measured on. Idempotent: a retry finds the model it created by name and run, and an
    already READY model is left as it is. Returns the model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    found = [model for model in client.search_logged_models([experiment_id],
                                                            filter_string=f"source_run_id = '{run_id}'")
             if model.name == meta["name"]]
    model = found[0] if found else client.create_logged_model(
        experiment_id, name=meta["name"], source_run_id=run_id, tags=meta.get("tags"),
        params=meta.get("params"), model_type=meta.get("model_type"))
    if model.status == LoggedModelStatus.READY:
        return model.model_id
    crash_point("logged_model", meta["name"])
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=meta["step"])])
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the link made before
        if not is_unique_key_race(error):  # a sender cut off after this call (a slow server) retries
            raise
    link_metrics(client, run_id, model.model_id, meta.get("metrics", []), meta.get("datasets", {}))
    described = Model.load(str(local_dir))  # the MLmodel file says which logged model it is
    described.model_id, described.model_uuid, described.run_id = model.model_id, model.model_id, run_id
    described.artifact_path = model.artifact_location
    described.save(str(Path(local_dir) / "MLmodel"))
    client.log_model_artifacts(model.model_id, str(local_dir))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def link_metrics(client, run_id: str, model_id: str, points: list, datasets: dict[str, dict]) -> None:
    """The run's points named by `points` ([key, step] pairs), logged again with the model's id
    and the split each was measured on, as MLflow's own log_model does for its step. The run
    keeps one point each: MLflow recognises the points it has (same key, step, value, time)."""
    from mlflow.entities import Metric

    steps_of: dict[str, set[int]] = {}
    for key, step in points:
        steps_of.setdefault(key, set()).add(int(step))
    linked = []
    for key, steps in steps_of.items():
        split = datasets.get(split_of(key) or "", {})
        linked += [Metric(key, point.value, point.timestamp, point.step, model_id=model_id, run_id=run_id,
                          dataset_name=split.get("name"), dataset_digest=split.get("digest"))
                   for point in client.get_metric_history(run_id, key) if point.step in steps]
    for start in range(0, len(linked), MAX_METRICS_PER_REQUEST):
        client.log_batch(run_id, metrics=linked[start:start + MAX_METRICS_PER_REQUEST])
