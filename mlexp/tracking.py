"""The only code that talks to MLflow while training.

`MlflowTracker` never blocks a training step: every call puts an operation on one FIFO
queue, and a background thread sends metrics with `log_batch` (up to 1,000 points per
request; a synchronous `log_metric` per batch would cost ~50 ms against an ~80 ms step).
Because the queue is FIFO, metrics logged before a checkpoint reach the server before that
checkpoint does. On resume the tracker reads the last step already logged for every
metric and drops re-sent points at or below it, so a resumed run has no duplicate and no
gap. Points that cannot be sent are written to a local JSON-lines file, never dropped.

`NullTracker` is the same protocol doing nothing: non-main processes and dry runs use it,
so the training code has no `if logging:` branches.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from mlexp.errors import MlexpError

MAX_METRICS_PER_REQUEST = 1000
MAX_PARAMS_PER_REQUEST = 100
SEND_INTERVAL_S = 2.0


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str, remove_after: bool = False) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str, error: str | None = None) -> None: ...


class NullTracker:
    """A tracker that records nothing (non-main processes, dry runs, benchmarks' baseline)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifacts(self, local_dir: Path, artifact_path: str, remove_after: bool = False) -> None:
        if remove_after:
            shutil.rmtree(local_dir, ignore_errors=True)

    def flush(self) -> None:
        pass

    def finish(self, status: str, error: str | None = None) -> None:
        pass


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in the current folder (MLflow 3's default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when an HTTP tracking server does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered: a server that has no /health is still a server
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise MlexpError(f"cannot reach the MLflow tracking server at {tracking_uri} ({reason}); "
                         "start it (`mlflow server --host 127.0.0.1 --port 5000`) or pass another "
                         "--tracking-uri") from None


def client_for(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


class MlflowTracker:
    """Logs one run to MLflow from a background thread. Create with `open_run`."""

    def __init__(self, client, run_id: str, already_logged: dict[str, int] | None = None,
                 spill_dir: Path | None = None):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = client.tracking_uri if hasattr(client, "tracking_uri") else None
        # Highest step already on the server per metric key (resume): points at or below are dropped.
        self._already_logged = already_logged or {}
        self._spill_path = (spill_dir or Path.cwd()) / f"mlexp-unsent-{run_id}.jsonl"
        self._queue: queue.Queue = queue.Queue()
        self._errors: list[str] = []
        self._worker = threading.Thread(target=self._work, name="mlexp-tracker", daemon=True)
        self._worker.start()

    # --- the protocol: all of these return at once ------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        self._queue.put(("params", dict(params)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(("tags", dict(tags)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self._queue.put(("metrics", [(key, float(value), timestamp, step) for key, value in metrics.items()
                                      if step > self._already_logged.get(key, -1)]))

    def log_artifacts(self, local_dir: Path, artifact_path: str, remove_after: bool = False) -> None:
        self._queue.put(("artifacts", (Path(local_dir), artifact_path, remove_after)))

    def flush(self) -> None:
        """Wait until everything queued so far has been sent (or spilled)."""
        done = threading.Event()
        self._queue.put(("flush", done))
        done.wait()

    def finish(self, status: str, error: str | None = None) -> None:
        """Send everything, then mark the run FINISHED, FAILED or KILLED."""
        if error:
            self.set_tags({"mlexp.error": error[:5000]})
        self._queue.put(("stop", None))
        self._worker.join()
        self._retry(lambda: self.client.set_terminated(self.run_id, status), "end the run")
        if self._errors:
            print(f"mlexp: warning: {len(self._errors)} tracking request(s) failed "
                  f"(first: {self._errors[0]}); unsent metrics are in {self._spill_path}", file=sys.stderr)

    # --- the background thread --------------------------------------------------------------
    def _work(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        pending: list = []
        last_send = time.monotonic()

        def send_pending() -> None:
            nonlocal pending, last_send
            for start in range(0, len(pending), MAX_METRICS_PER_REQUEST):
                chunk = pending[start:start + MAX_METRICS_PER_REQUEST]
                metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in chunk]
                if not self._retry(lambda: self.client.log_batch(self.run_id, metrics=metrics), "log metrics"):
                    self._spill(chunk)
            pending, last_send = [], time.monotonic()

        while True:
            try:
                kind, payload = self._queue.get(timeout=SEND_INTERVAL_S)
            except queue.Empty:
                if pending:
                    send_pending()
                continue
            if kind == "metrics":
                pending.extend(payload)
                if len(pending) >= MAX_METRICS_PER_REQUEST or time.monotonic() - last_send > SEND_INTERVAL_S:
                    send_pending()
                continue
            send_pending()  # everything before this operation goes first
            if kind == "params":
                items = list(payload.items())
                for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
                    chunk = [Param(k, v) for k, v in items[start:start + MAX_PARAMS_PER_REQUEST]]
                    self._retry(lambda: self.client.log_batch(self.run_id, params=chunk), "log params")
            elif kind == "tags":
                tags = [RunTag(k, str(v)) for k, v in payload.items()]
                self._retry(lambda: self.client.log_batch(self.run_id, tags=tags), "set tags")
            elif kind == "artifacts":
                local_dir, artifact_path, remove_after = payload
                self._retry(lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path),
                            f"upload {artifact_path}")
                if remove_after:
                    shutil.rmtree(local_dir, ignore_errors=True)
            elif kind == "flush":
                payload.set()
            elif kind == "stop":
                return

    def _retry(self, request, what: str, attempts: int = 3) -> bool:
        for attempt in range(attempts):
            try:
                request()
                return True
            except Exception as error:  # noqa: BLE001 - a tracking failure must not kill training
                if attempt == attempts - 1:
                    self._errors.append(f"{what}: {str(error).splitlines()[0][:200]}")
                    return False
                time.sleep(0.5 * 2 ** attempt)
        return False

    def _spill(self, points: list) -> None:
        with open(self._spill_path, "a") as spill:
            for key, value, timestamp, step in points:
                spill.write(json.dumps({"run_id": self.run_id, "key": key, "value": value,
                                        "timestamp": timestamp, "step": step}) + "\n")


def last_logged_steps(client, run_id: str) -> dict[str, int]:
    """The highest step logged so far for every metric of a run (for resume)."""
    run = client.get_run(run_id)
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics}


def open_run(tracking_uri: str, experiment: str, run_name: str | None, *, resume_run_id: str | None = None,
             parent_run_id: str | None = None, run_id: str | None = None,
             tags: dict[str, str] | None = None) -> MlflowTracker:
    """Start (or continue) the MLflow run this training logs to.

    `run_id` is a run created for us (a sweep's child). Under `mlflow run` the entry
    point's run is given in MLFLOW_RUN_ID and is used as is (its experiment was chosen by
    `mlflow run`). `--resume` continues an existing run.
    """
    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    from mlflow.exceptions import MlflowException

    project_run_id = run_id or (None if parent_run_id else os.environ.get("MLFLOW_RUN_ID"))
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException:
            raise MlexpError(f"cannot resume: no MLflow run {resume_run_id!r} at {tracking_uri}; "
                             "check the run id (mlflow ui shows it) and --tracking-uri") from None
        client.update_run(resume_run_id, status="RUNNING")
        return MlflowTracker(client, run.info.run_id, last_logged_steps(client, resume_run_id))
    if project_run_id:
        client.get_run(project_run_id)  # raises if MLflow handed us a run that does not exist
        tracker = MlflowTracker(client, project_run_id)
        tracker.set_tags({**(tags or {}), **({"mlflow.runName": run_name} if run_name else {})})
        return tracker
    try:
        experiment_id = experiment_id_for(client, experiment)
    except MlflowException as error:
        raise MlexpError(f"cannot use MLflow experiment {experiment!r} at {tracking_uri}: "
                         f"{str(error).splitlines()[0]}") from None
    all_tags = dict(tags or {})
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return MlflowTracker(client, run.info.run_id)


def experiment_id_for(client, experiment: str) -> str:
    """The experiment's id, creating it if needed; under `mlflow run`, the one it chose."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID") and os.environ.get("MLFLOW_RUN_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment)


def existing_params(tracker: Any) -> dict[str, str]:
    """Params already on the run (under `mlflow run`, MLflow logs the requested values first)."""
    if not isinstance(tracker, MlflowTracker):
        return {}
    return dict(tracker.client.get_run(tracker.run_id).data.params)


def params_to_log(effective: dict[str, str], already: dict[str, str]) -> dict[str, str]:
    """Effective params, under their own names wherever MLflow allows it.

    MLflow params are immutable. Under `mlflow run` the requested values are logged before
    mlexp starts; where the effective value differs (alias resolved, scratch multiplier,
    preset) it is logged as `effective.<name>` and config.json holds the whole effective config.
    """
    params = {}
    for key, value in effective.items():
        if key not in already:
            params[key] = value
        elif not same_value(already[key], value):
            params[f"effective.{key}"] = value
    return params


def same_value(a: str, b: str) -> bool:
    """'0' and '0.0', 'false' and 'False' are the same parameter value; so are '' and the
    shell-quoted empty string `''` that `mlflow run` logs for an empty parameter."""
    a, b = ("" if v in ("''", '""') else v for v in (a, b))
    if a == b or a.lower() == b.lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False
