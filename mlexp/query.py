"""Read runs and their metric histories from MLflow, fast (for `compare` and `monitor`).

The expensive part of comparing many runs is the per-epoch histories: one
`get_metric_history` call per run and key is 4,000 HTTP requests for 2,000 runs and two
curves (~30 s against a local server). Instead:

- HTTP servers: runs come from the REST `runs/search` endpoint as plain JSON (parsing the
  protobuf into entities costs ~0.6 s per 1,000 runs on the client), and histories from
  the server's bulk endpoint `get-history-bulk` (100 runs per request, one SQL query each;
  the UI uses it for its charts). Servers without it get the public
  `get-history-bulk-interval` REST endpoint. History requests for one page of runs go out
  on a thread pool while the server searches the next page.
- Other stores (SQLite, files): `MlflowClient.search_runs`, and the store's own bulk query
  where it has one (SQLAlchemy), else `get_metric_history` per run.

Python's cyclic garbage collector is paused while the results are built: it does no
useful work on these acyclic records and otherwise takes most of the time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mlexp.errors import MlexpError

FINISHED = "FINISHED"
SEARCH_PAGE = 1000
BULK_RUNS = 100           # the server's limit of run ids per bulk history request
BULK_MAX_POINTS = 25_000  # the server's limit of points per bulk history request
INTERVAL_MAX_PER_RUN = 2_500

# key -> run_id -> [(step, value)], sorted by step
Histories = dict[str, dict[str, list[tuple[int, float]]]]


@dataclass
class RunRecord:
    """One run as compare and monitor need it: identity, status, params, tags, latest metrics."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    start_time: int | None = None
    end_time: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        """The effective value: under `mlflow run` a changed value is logged as `effective.NAME`."""
        return self.params.get(f"effective.{name}", self.params.get(name))


def mlflow_client(client_or_uri: Any = None):
    """An MlflowClient from a client, a tracking URI, or None (MLflow's default URI)."""
    from mlflow import MlflowClient

    if client_or_uri is None or isinstance(client_or_uri, str):
        return MlflowClient(tracking_uri=client_or_uri)
    return client_or_uri


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(error).__name__


def resolve_experiments(client, experiments: list[str] | None) -> dict[str, str]:
    """Experiment names (or ids) -> {id: name}. None or [] means every active experiment."""
    from mlflow.exceptions import MlflowException

    try:
        if not experiments:
            found = client.search_experiments()
            return {e.experiment_id: e.name for e in found}
        resolved = {}
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None and name.isdigit():
                experiment = _experiment_by_id(client, name)
            if experiment is None or experiment.lifecycle_stage != "active":
                known = sorted(e.name for e in client.search_experiments())
                raise MlexpError(f"no MLflow experiment {name!r} at {client.tracking_uri}; existing "
                                 f"experiments: {', '.join(known) or 'none'}")
            resolved[experiment.experiment_id] = experiment.name
        return resolved
    except MlflowException as error:
        raise MlexpError(f"cannot read experiments from {client.tracking_uri}: {one_line(error)}") from None


def _experiment_by_id(client, experiment_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_experiment(experiment_id)
    except MlflowException:
        return None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many acyclic objects (it would rescan them repeatedly)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def fetch_runs(client, experiment_ids: list[str], filter_string: str | None = None,
               history_keys: tuple[str, ...] = (),
               wants_history: Callable[[RunRecord], bool] = lambda run: True,
               ) -> tuple[list[RunRecord], Histories]:
    """All active runs of the experiments matching the filter, and the histories of
    `history_keys` for the runs `wants_history` selects. User errors raise MlexpError."""
    from mlflow.exceptions import MlflowException

    check_filter(filter_string)
    source = _source_for(client)
    runs: list[RunRecord] = []
    pending: list[tuple[str, Future]] = []
    histories: Histories = {key: {} for key in history_keys}
    try:
        with gc_paused(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="mlexp-history") as pool:
            token = None
            while True:
                page, token = source.search_page(experiment_ids, filter_string, token)
                runs.extend(page)
                run_ids = [run.run_id for run in page if wants_history(run)]
                for key in history_keys:
                    for start in range(0, len(run_ids), source.batch_size):
                        batch = run_ids[start:start + source.batch_size]
                        pending.append((key, pool.submit(source.histories, batch, key)))
                if not token:
                    break
            for key, future in pending:
                for run_id, points in future.result().items():
                    histories[key][run_id] = points
    except MlflowException as error:
        message = one_line(error)
        if filter_string and error.error_code == "INVALID_PARAMETER_VALUE":
            raise MlexpError(f"MLflow rejected the filter {filter_string!r}: {message}") from None
        raise MlexpError(f"cannot search runs at {client.tracking_uri}: {message}") from None
    for per_run in histories.values():
        for points in per_run.values():
            points.sort()
    return runs, histories


def check_filter(filter_string: str | None) -> None:
    """Parse the filter as MLflow will, so a typo is reported the same way on every store."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.search_utils import SearchUtils

    if not filter_string:
        return
    try:
        SearchUtils.parse_search_filter(filter_string)
    except MlflowException as error:
        raise MlexpError(f"MLflow rejected the filter {filter_string!r}: {one_line(error)} (syntax: "
                         "metrics.`val/acc` > 0.9 and params.lr = '0.001' and tags.`mlexp.init` = 'scratch')"
                         ) from None


def _source_for(client):
    uri = str(client.tracking_uri)
    if uri.startswith(("http://", "https://")):
        return _RestSource(client)
    return _StoreSource(client)


def _group_points(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Bulk-endpoint JSON rows -> run_id -> [(step, value)]."""
    per_run: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        per_run.setdefault(row["run_id"], []).append((int(row.get("step", 0)), float(row["value"])))
    return per_run


class _RestSource:
    """An HTTP tracking server, through its REST API (plain JSON, bulk history endpoints)."""

    batch_size = BULK_RUNS

    def __init__(self, client):
        from mlflow.utils.credentials import get_default_host_creds

        self.client = client
        self.creds = get_default_host_creds(str(client.tracking_uri))
        self.bulk_available = True

    def _request(self, endpoint: str, method: str, **kwargs) -> Any:
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        response = http_request(self.creds, endpoint, method, **kwargs)
        return verify_rest_response(response, endpoint).json()

    def search_page(self, experiment_ids: list[str], filter_string: str | None,
                    token: str | None) -> tuple[list[RunRecord], str | None]:
        body: dict[str, Any] = {"experiment_ids": experiment_ids, "max_results": SEARCH_PAGE,
                                "run_view_type": "ACTIVE_ONLY"}
        if filter_string:
            body["filter"] = filter_string
        if token:
            body["page_token"] = token
        reply = self._request("/api/2.0/mlflow/runs/search", "POST", json=body)
        return [_record_from_json(run) for run in reply.get("runs", [])], reply.get("next_page_token") or None

    def histories(self, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
        if self.bulk_available:
            from mlflow.utils.rest_utils import http_request, verify_rest_response

            endpoint = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
            response = http_request(self.creds, endpoint, "GET",
                                    params={"run_id": run_ids, "metric_key": key, "max_results": BULK_MAX_POINTS})
            if response.status_code != 404:
                rows = verify_rest_response(response, endpoint).json().get("metrics", [])
                if len(rows) < BULK_MAX_POINTS:
                    return _group_points(rows)
                return self._split(run_ids, key)  # the reply may be cut at the limit
            self.bulk_available = False  # e.g. a proxy that only forwards /api/
        reply = self._request("/api/2.0/mlflow/metrics/get-history-bulk-interval", "GET",
                              params={"run_ids": run_ids, "metric_key": key, "max_results": INTERVAL_MAX_PER_RUN})
        return _group_points(reply.get("metrics", []))

    def _split(self, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
        if len(run_ids) == 1:  # one run with more points than a bulk reply holds
            return {run_ids[0]: [(m.step, m.value) for m in self.client.get_metric_history(run_ids[0], key)]}
        middle = len(run_ids) // 2
        return {**self.histories(run_ids[:middle], key), **self.histories(run_ids[middle:], key)}


def _record_from_json(run: dict) -> RunRecord:
    info, data = run["info"], run.get("data", {})
    return RunRecord(
        run_id=info["run_id"], experiment_id=str(info["experiment_id"]),
        run_name=info.get("run_name") or next((t.get("value", "") for t in data.get("tags", [])
                                                if t["key"] == "mlflow.runName"), ""),
        status=info.get("status", ""),
        start_time=int(info["start_time"]) if info.get("start_time") else None,
        end_time=int(info["end_time"]) if info.get("end_time") else None,
        params={p["key"]: p.get("value", "") for p in data.get("params", [])},
        tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
        metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},
    )


class _StoreSource:
    """Any other store (SQLite, file): the client's search, the store's bulk history query."""

    batch_size = 500

    def __init__(self, client):
        self.client = client
        # The SQLAlchemy store answers a history query for many runs at once; MlflowClient has no
        # public door to it, so reach the store it wraps and fall back when it is not there.
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        self.bulk = getattr(store, "get_metric_history_bulk", None)

    def search_page(self, experiment_ids: list[str], filter_string: str | None,
                    token: str | None) -> tuple[list[RunRecord], str | None]:
        page = self.client.search_runs(experiment_ids, filter_string or "", max_results=SEARCH_PAGE,
                                       page_token=token)
        return [_record_from_entity(run) for run in page], page.token or None

    def histories(self, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
        if self.bulk is not None:
            per_run: dict[str, list[tuple[int, float]]] = {}
            for item in self.bulk(run_ids=run_ids, metric_key=key, max_results=10**9):
                per_run.setdefault(item.run_id, []).append((item.step, item.value))
            return per_run
        return {run_id: [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
                for run_id in run_ids}


def _record_from_entity(run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(run_id=info.run_id, run_name=info.run_name or "", experiment_id=str(info.experiment_id),
                     status=info.status, start_time=info.start_time, end_time=info.end_time,
                     params=dict(data.params), tags=dict(data.tags), metrics=dict(data.metrics))


def latest_step(histories: Histories, run_id: str, *keys: str) -> int:
    """The highest step logged for the first of `keys` that has any points (0 if none)."""
    for key in keys:
        points = histories.get(key, {}).get(run_id)
        if points:
            return points[-1][0]
    return 0
