"""Every non-public MLflow API mlexp uses, each behind a public-API fallback.

`compare` and `monitor` read thousands of runs and their per-epoch histories. MLflow's public
Python API reads a history one run and one key at a time, and parses every search reply into
entities; the doors below are much faster, but MLflow does not promise to keep them. So each
is used only while it answers as expected: a missing module, method or endpoint, or a reply
of an unexpected shape, closes that door for the `Reader` (the reason goes to
`Reader.fallbacks`, the count of answers per door to `Reader.taken`) and the public API
answers instead. tests/analysis/test_mlflow_internals.py runs every door against a real `mlflow server`
and a real SQLite store, checks it returns what the public API returns, and fails when a door
is no longer taken: an MLflow upgrade that changes one fails there, not as a slow `compare`.

The doors, and why each is used:

- `mlflow.utils.rest_utils.http_request` / `verify_rest_response` and
  `mlflow.utils.credentials.get_default_host_creds`: MLflow's own HTTP session (credentials,
  TLS settings, retries from the environment) for the REST calls below.
- REST `POST /api/2.0/mlflow/runs/search`, read as plain JSON ("rest-search"): the endpoint is
  public, but MlflowClient.search_runs turns every reply into protobuf and entities, ~0.6 s
  per 1,000 runs on the client. Fallback: MlflowClient.search_runs.
- The UI's `GET /ajax-api/2.0/mlflow/metrics/get-history-bulk` ("history-bulk"): the histories
  of up to 100 runs for one key in one request (one SQL query on the server). One
  get_metric_history call per run and key is 4,000 requests for 2,000 runs and two curves
  (~30 s against a local server). A reply is cut at 25,000 points: a full one is asked again
  in halves, and a single run with more points is read through get_metric_history.
- `GET /api/2.0/mlflow/metrics/get-history-bulk-interval` ("history-bulk-interval"): in
  MLflow's protos but not in MlflowClient; the same for servers or proxies without the
  /ajax-api/ route. It samples runs with more than 2,500 points: those are read one by one.
  Fallback for both history doors: MlflowClient.get_metric_history per run.
- `MlflowClient._tracking_client.store.get_metric_history_bulk` ("store-history-bulk"):
  SQLAlchemy stores (sqlite:, postgresql:, ...) answer 500 runs in one SQL query. Through
  get_metric_history a local SQLite file takes ~1 ms per run and key (~4 s for 2,000 runs and
  two curves); the bulk query takes 0.05-0.2 s per 500 runs. Fallback: get_metric_history.
- `mlflow.utils.search_utils.SearchUtils.parse_search_filter` ("filter-parse"): parse a
  filter before any request, so a typo reads the same on every store. Fallback: no local
  check; the store rejects a bad filter itself.
"""

# Imported where used: `mlflow` (about 1.4 s), because `mlexp --help`, the option checks and
# their one-line errors import this module and come before it.
from __future__ import annotations

import threading
from collections import Counter
from typing import Any

SEARCH_PAGE = 1000
BULK_RUNS = 100           # the server's limit of run ids per bulk history request
BULK_MAX_POINTS = 25_000  # the server's limit of points per bulk history request
INTERVAL_MAX_PER_RUN = 2_500  # the interval endpoint samples runs with more points
STORE_BULK_RUNS = 500
SEARCH_ENDPOINT = "/api/2.0/mlflow/runs/search"
BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
INTERVAL_ENDPOINT = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
MISSING = (404, 405, 501)  # an endpoint this server (or a proxy before it) does not have
REST_DOORS = ("rest-search", "history-bulk", "history-bulk-interval")

Points = list[tuple[int, float]]
RUN_FIELDS = ("run_id", "run_name", "experiment_id", "status", "start_time", "end_time", "params", "tags",
              "metrics")


class Unexpected(Exception):
    """A door answered, but not in the shape this module knows."""


def parse_filter(filter_string: str) -> bool:
    """Parse a search filter as MLflow's stores will: MlflowException if it is malformed.
    True if it was checked here, False if MLflow's parser is not where it used to be."""
    try:
        from mlflow.utils.search_utils import SearchUtils

        parse = SearchUtils.parse_search_filter
    except (ImportError, AttributeError):
        return False
    parse(filter_string)
    return True


def is_http(tracking_uri: Any) -> bool:
    return str(tracking_uri).startswith(("http://", "https://"))


class Reader:
    """Runs (as dicts of RUN_FIELDS) and metric histories from one store, by the fastest open door.

    Thread-safe: histories may be asked for from several threads at once."""

    def __init__(self, client):
        self.client = client
        self.rest = is_http(client.tracking_uri)
        self.batch_size = BULK_RUNS if self.rest else STORE_BULK_RUNS
        self.bulk_max_points = BULK_MAX_POINTS
        self.page_size = SEARCH_PAGE
        self.taken: Counter[str] = Counter()
        self.fallbacks: list[str] = []
        self._closed: set[str] = set()
        self._lock = threading.Lock()
        self._http = _http_session(client.tracking_uri) if self.rest else None
        if self.rest and self._http is None:
            for door in REST_DOORS:
                self._close(door, "mlflow.utils.rest_utils or mlflow.utils.credentials changed")
        self._store_bulk = None if self.rest else _store_bulk_method(client)
        if not self.rest and self._store_bulk is None:
            self._close("store-history-bulk", f"{type(_store_of(client)).__name__} has no get_metric_history_bulk")

    def is_open(self, door: str) -> bool:
        return door not in self._closed

    def _close(self, door: str, reason: str) -> None:
        with self._lock:
            if door not in self._closed:
                self._closed.add(door)
                self.fallbacks.append(f"{door}: {reason}")

    def _took(self, door: str) -> None:
        with self._lock:
            self.taken[door] += 1

    # --- runs ------------------------------------------------------------------------------------
    def search_page(self, experiment_ids: list[str], filter_string: str | None,
                    token: str | None) -> tuple[list[dict], str | None]:
        """One page of active runs, and the next page's token (None after the last)."""
        if self.rest and self.is_open("rest-search"):
            try:
                page = self.rest_search_page(experiment_ids, filter_string, token)
                self._took("rest-search")
                return page
            except Unexpected as why:
                self._close("rest-search", str(why))
        page = self.client.search_runs(experiment_ids, filter_string or "", max_results=self.page_size,
                                       page_token=token)
        self._took("public-search")
        return [fields_from_entity(run) for run in page], page.token or None

    def rest_search_page(self, experiment_ids: list[str], filter_string: str | None,
                         token: str | None) -> tuple[list[dict], str | None]:
        body: dict[str, Any] = {"experiment_ids": experiment_ids, "max_results": self.page_size,
                                "run_view_type": "ACTIVE_ONLY"}
        if filter_string:
            body["filter"] = filter_string
        if token:
            body["page_token"] = token
        reply = self._call(SEARCH_ENDPOINT, "POST", strict=True, json=body)
        try:
            runs = [fields_from_json(run) for run in reply.get("runs", [])]
            return runs, reply.get("next_page_token") or None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise Unexpected(f"runs/search reply not understood ({type(error).__name__}: {error})") from None

    def _call(self, endpoint: str, method: str, strict: bool = False, **kwargs) -> dict:
        """The JSON reply. Unexpected: the endpoint is missing, or (not strict) refused the request,
        or the reply is not a JSON object. strict: a refusal raises MLflow's own exception."""
        http_request, verify = self._http["request"], self._http["verify"]
        response = http_request(self._http["creds"], endpoint, method, **kwargs)
        status = response.status_code
        if status in MISSING or (status != 200 and not strict):
            raise Unexpected(f"{endpoint} answered HTTP {status}: {' '.join(response.text.split())[:200]}")
        try:
            reply = verify(response, endpoint).json()
        except ValueError:
            raise Unexpected(f"{endpoint} answered something other than JSON") from None
        if not isinstance(reply, dict):
            raise Unexpected(f"{endpoint} answered JSON {type(reply).__name__}, not an object")
        return reply

    # --- histories -------------------------------------------------------------------------------
    def histories(self, run_ids: list[str], key: str) -> dict[str, Points]:
        """run_id -> [(step, value)] for `key` (runs without a point are left out), unsorted."""
        doors = ((("history-bulk", self.bulk_histories), ("history-bulk-interval", self.interval_histories))
                 if self.rest else (("store-history-bulk", self.store_histories),))
        for door, read in doors:
            if not self.is_open(door):
                continue
            try:
                found = read(run_ids, key)
                self._took(door)
                return found
            except Unexpected as why:
                self._close(door, str(why))
        return self.public_histories(run_ids, key)

    def public_histories(self, run_ids: list[str], key: str) -> dict[str, Points]:
        self._took("public-history")
        found = {run_id: [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
                 for run_id in run_ids}
        return {run_id: points for run_id, points in found.items() if points}

    def bulk_histories(self, run_ids: list[str], key: str) -> dict[str, Points]:
        reply = self._call(BULK_ENDPOINT, "GET",
                           params={"run_id": run_ids, "metric_key": key, "max_results": self.bulk_max_points})
        if "metrics" not in reply:
            raise Unexpected(f"{BULK_ENDPOINT} answered without 'metrics'")
        rows = reply["metrics"]
        if len(rows) < self.bulk_max_points:
            return group_points(rows, run_ids, key)
        if len(run_ids) == 1:  # one run with more points than a reply holds
            return self.public_histories(run_ids, key)
        middle = len(run_ids) // 2  # the reply may be cut at the limit
        return {**self.bulk_histories(run_ids[:middle], key), **self.bulk_histories(run_ids[middle:], key)}

    def interval_histories(self, run_ids: list[str], key: str) -> dict[str, Points]:
        reply = self._call(INTERVAL_ENDPOINT, "GET",
                           params={"run_ids": run_ids, "metric_key": key, "max_results": INTERVAL_MAX_PER_RUN})
        found = group_points(reply.get("metrics", []), run_ids, key)
        sampled = [run_id for run_id, points in found.items() if len(points) >= INTERVAL_MAX_PER_RUN]
        return {**found, **(self.public_histories(sampled, key) if sampled else {})}

    def store_histories(self, run_ids: list[str], key: str) -> dict[str, Points]:
        wanted = set(run_ids)
        found: dict[str, Points] = {}
        try:
            for item in self._store_bulk(run_ids=run_ids, metric_key=key, max_results=10**9):
                if item.run_id not in wanted or item.key != key:
                    raise Unexpected(f"get_metric_history_bulk returned {item.key!r} of run {item.run_id}")
                found.setdefault(item.run_id, []).append((int(item.step), float(item.value)))
        except (AttributeError, TypeError) as error:
            raise Unexpected(f"get_metric_history_bulk changed ({type(error).__name__}: {error})") from None
        return found


def group_points(rows: Any, run_ids: list[str], key: str) -> dict[str, Points]:
    """Bulk-endpoint JSON rows -> run_id -> [(step, value)]; Unexpected unless every row is a
    point of `key` of a requested run."""
    wanted = set(run_ids)
    per_run: dict[str, Points] = {}
    try:
        for row in rows:
            if row["run_id"] not in wanted or row.get("key", key) != key:
                raise Unexpected(f"a history reply holds {row.get('key')!r} of run {row['run_id']}")
            per_run.setdefault(row["run_id"], []).append((int(row.get("step", 0)), float(row["value"])))
    except (KeyError, TypeError, ValueError) as error:
        raise Unexpected(f"history rows not understood ({type(error).__name__}: {error})") from None
    return per_run


def fields_from_json(run: dict) -> dict[str, Any]:
    """A runs/search JSON run -> RUN_FIELDS."""
    info, data = run["info"], run.get("data", {})
    tags = {t["key"]: t.get("value", "") for t in data.get("tags", [])}
    return {
        "run_id": info["run_id"], "experiment_id": str(info["experiment_id"]),
        "run_name": info.get("run_name") or tags.get("mlflow.runName", ""),
        "status": info.get("status", ""),
        "start_time": int(info["start_time"]) if info.get("start_time") else None,
        "end_time": int(info["end_time"]) if info.get("end_time") else None,
        "params": {p["key"]: p.get("value", "") for p in data.get("params", [])},
        "tags": tags, "metrics": {m["key"]: float(m["value"]) for m in data.get("metrics", [])},
    }


def fields_from_entity(run) -> dict[str, Any]:
    """An mlflow.entities.Run (public API) -> RUN_FIELDS."""
    info, data = run.info, run.data
    return {"run_id": info.run_id, "run_name": info.run_name or "", "experiment_id": str(info.experiment_id),
            "status": info.status, "start_time": info.start_time, "end_time": info.end_time,
            "params": dict(data.params), "tags": dict(data.tags), "metrics": dict(data.metrics)}


def _http_session(tracking_uri: Any) -> dict[str, Any] | None:
    try:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        return {"creds": get_default_host_creds(str(tracking_uri)), "request": http_request,
                "verify": verify_rest_response}
    except (ImportError, AttributeError, TypeError):
        return None


def _store_of(client) -> Any:
    return getattr(getattr(client, "_tracking_client", None), "store", None)


def _store_bulk_method(client) -> Any:
    """The SQLAlchemy store's many-runs history query; MlflowClient has no public door to it."""
    return getattr(_store_of(client), "get_metric_history_bulk", None)
