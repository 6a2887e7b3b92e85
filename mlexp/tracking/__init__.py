"""The tracking seam: every MLflow write of mlexp goes through this package.

Nothing a run produces is lost and nothing it reports is false:

- `outbox`: every operation of a run (params, tags, metric points with their steps and
  original timestamps, artifact uploads, checkpoint manifests, the final status) is first
  committed to a crash-safe local SQLite outbox;
- `sender`: background lanes drain it to the server, metrics never behind an upload, with
  bounded requests and their own backoff;
- `run`: `RunTracker`, the training side's view of it, and `open_run`;
- `sync`: `mlexp sync` sends what an ended process left behind (or an offline run);
- `server`: the only code that calls MLflow's write API.

The training loop never imports this package; `NullTracker` is the same protocol doing
nothing (non-main processes, dry runs), so training code has no `if logging:` branches.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

from mlexp.tracking.run import Delivery, RunTracker, create_child_run, end_run, offline_requested, open_run
from mlexp.tracking.server import check_reachable, client_for, default_tracking_uri

__all__ = ["Tracker", "NullTracker", "RunTracker", "Delivery", "open_run", "create_child_run", "end_run",
           "offline_requested", "check_reachable", "client_for", "default_tracking_uri", "params_to_log",
           "existing_params", "same_value", "ui_hint"]


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def staging_dir(self, name: str) -> Path: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str, copy: bool = False) -> None: ...
    def publish_checkpoint(self, manifest_dir: Path, artifact_path: str, epoch: int) -> None: ...
    def supersede(self, artifact_prefix: str, keep_newest: bool = False) -> None: ...
    def log_inputs(self, splits: list[dict], model_ids: list[str] | None = None) -> None: ...
    def link_metrics(self, model_id: str, metrics: list, datasets: dict) -> None: ...
    def log_model(self, model_dir: Path, name: str, step: int, meta: dict) -> None: ...
    def last_step(self, key: str) -> int: ...
    def remember(self, key: str, value: Any) -> None: ...
    def mark_running(self) -> None: ...
    def finish(self, status: str, error: str | None = None, wait_s: float | None = None) -> Delivery | None: ...
    def abandon(self, wait_s: float = 5.0) -> Delivery | None: ...


class NullTracker:
    """A tracker that records nothing (non-main processes, dry runs, benchmarks' baseline)."""

    run_id: str | None = None

    def __init__(self) -> None:
        self._scratch: Path | None = None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def staging_dir(self, name: str) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="mlexp-untracked-"))
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self._scratch))

    def log_artifacts(self, local_dir: Path, artifact_path: str, copy: bool = False) -> None:
        if not copy:
            shutil.rmtree(local_dir, ignore_errors=True)

    def publish_checkpoint(self, manifest_dir: Path, artifact_path: str, epoch: int) -> None:
        shutil.rmtree(manifest_dir, ignore_errors=True)

    def supersede(self, artifact_prefix: str, keep_newest: bool = False) -> None:
        pass

    def log_inputs(self, splits: list[dict], model_ids: list[str] | None = None) -> None:
        pass

    def link_metrics(self, model_id: str, metrics: list, datasets: dict) -> None:
        pass

    def log_model(self, model_dir: Path, name: str, step: int, meta: dict) -> None:
        shutil.rmtree(model_dir, ignore_errors=True)

    def last_step(self, key: str) -> int:
        return 0

    def remember(self, key: str, value: Any) -> None:
        pass

    def mark_running(self) -> None:
        pass

    def finish(self, status: str, error: str | None = None, wait_s: float | None = None) -> None:
        self.abandon()

    def abandon(self, wait_s: float = 5.0) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def existing_params(tracker: Any) -> dict[str, str]:
    """Params already on an adopted run (under `mlflow run`, MLflow logs the requested values
    first). A run mlexp created has none; a server that does not answer now is no reason to
    stop (a conflicting param is then refused by the server and kept in the outbox)."""
    if not isinstance(tracker, RunTracker) or tracker.offline or not tracker.adopted:
        return {}
    try:
        return dict(tracker.client.get_run(tracker.run_id).data.params)
    except Exception:  # noqa: BLE001
        return {}


def ui_hint(tracking_uri: str, experiment_id: str | None = None) -> str:
    """How to look at runs: one command that works as printed (for a local store), and the
    address to open. The address names the experiment and MLflow 3's model-training view
    (`workflowType=machine_learning`): without it the UI opens on its GenAI overview."""
    page = f"/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}{page} in a browser"
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve()}"  # works from any folder
    mlflow = Path(sys.executable).parent / "mlflow"  # the mlflow of this environment, activated or not
    return (f"{mlflow if mlflow.exists() else 'mlflow'} ui --backend-store-uri {tracking_uri}, "
            f"then open http://127.0.0.1:5000{page}")


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
