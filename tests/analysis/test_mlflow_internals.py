"""The MLflow internals mlexp reads through (mlexp.analysis.mlflow_internals), against real stores.

Every door is run against a real `mlflow server` (REST) or a real SQLite store, must return
what MLflow's public API returns, and must actually have been taken: if an MLflow upgrade
moves or changes one, these tests fail here (compare would only get slower). Where a door is
missing (a proxy that forwards only some paths, a store without the bulk query), the public
API must answer the same.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from mlexp.analysis.mlflow_internals import INTERVAL_MAX_PER_RUN, Reader, fields_from_entity, parse_filter
from mlexp.analysis.query import fetch_runs, read_histories
from tests.run_factory import experiment_id, log_run

LONG_RUN_POINTS = INTERVAL_MAX_PER_RUN + 100  # more than the interval endpoint returns unsampled
HTML = b"<!doctype html><html><body>MLflow</body></html>"


def populate(client: MlflowClient, experiment: str) -> list[str]:
    """Five training runs of different lengths and statuses, and one run with a long history."""
    ids = [log_run(client, experiment, seed=seed, val_acc=[0.1 * seed + 0.01 * e for e in range(seed + 1)])
           for seed in range(1, 4)]
    ids.append(log_run(client, experiment, init="scratch", val_acc=[0.3, 0.4], status="FAILED"))
    ids.append(log_run(client, experiment, strategy="linear", val_acc=[0.5], status="RUNNING"))
    long_run = client.create_run(experiment_id(client, experiment), run_name="long").info.run_id
    points = [Metric("val/acc", step / LONG_RUN_POINTS, 1000 + step, step) for step in range(LONG_RUN_POINTS)]
    for start in range(0, len(points), 1000):
        client.log_batch(long_run, metrics=points[start:start + 1000])
    client.set_terminated(long_run)
    return [*ids, long_run]


def public_histories(client: MlflowClient, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    found = {run_id: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for run_id in run_ids}
    return {run_id: points for run_id, points in found.items() if points}


def same_histories(found: dict, client: MlflowClient, run_ids: list[str], key: str) -> None:
    assert {run_id: sorted(points) for run_id, points in found.items()} == public_histories(client, run_ids, key)


def assert_taken(reader: Reader, door: str, times: int | None = None) -> None:
    """The door answered (and nothing fell back): else MLflow changed under mlexp."""
    assert not reader.fallbacks, (f"MLflow {mlflow.__version__} no longer answers as mlexp.analysis.mlflow_internals "
                                  f"expects: {reader.fallbacks}")
    assert reader.taken[door] >= 1, f"the {door} door was not taken: {dict(reader.taken)}"
    if times is not None:
        assert reader.taken[door] == times, dict(reader.taken)
    assert not {"public-search", "public-history"} & set(reader.taken), dict(reader.taken)


@pytest.fixture(scope="module")
def live(mlflow_server) -> tuple[MlflowClient, str, list[str]]:
    client = MlflowClient(mlflow_server)
    name = f"internals-{uuid.uuid4().hex[:6]}"
    run_ids = populate(client, name)
    return client, experiment_id(client, name), run_ids


# --- REST doors against a real server ---------------------------------------------------------------------
def test_rest_search_reads_plain_json_like_the_public_api(live):
    client, experiment, run_ids = live
    reader = Reader(client)
    reader.page_size = 2  # three pages: the page tokens are followed
    found, token = [], None
    while True:
        page, token = reader.search_page([experiment], None, token)
        found += page
        if not token:
            break
    assert_taken(reader, "rest-search", times=3)
    public = {run.info.run_id: fields_from_entity(run) for run in client.search_runs([experiment], max_results=100)}
    assert {fields["run_id"]: fields for fields in found} == public
    assert set(public) == set(run_ids)

    filtered = Reader(client)
    page, _ = filtered.search_page([experiment], "tags.`mlexp.init` = 'scratch'", None)
    assert_taken(filtered, "rest-search")
    assert {fields["run_id"] for fields in page} == {run_ids[3]}
    with pytest.raises(MlflowException) as refused:  # the server's own refusal, not a fallback
        Reader(client).search_page([experiment], "metrics.x >>> 1", None)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


def test_ui_bulk_history_endpoint_returns_the_public_histories(live):
    client, _, run_ids = live
    for key in ("val/acc", "val/loss", "no/such-key"):
        reader = Reader(client)
        same_histories(reader.histories(run_ids, key), client, run_ids, key)
        assert_taken(reader, "history-bulk", times=1)


def test_one_more_key_is_read_in_the_server_s_batches_sorted_by_step(live):
    """compare reads a user's task's curve once it knows its name (read_histories): in batches
    of at most the server's run limit, never one request the server would refuse."""
    client, _, run_ids = live
    reader = Reader(client)
    reader.batch_size = 2  # as 100 is for thousands of runs
    found = read_histories(reader, run_ids, "val/acc")
    assert found == public_histories(client, run_ids, "val/acc")  # every run's, each sorted by step
    assert_taken(reader, "history-bulk", times=3)  # 6 runs, 2 a request


def test_bulk_history_replies_cut_at_the_point_limit_are_asked_again_in_halves(live):
    client, _, run_ids = live
    reader = Reader(client)
    reader.bulk_max_points = 5  # every reply is full: halves, down to single runs read one by one
    same_histories(reader.histories(run_ids, "val/acc"), client, run_ids, "val/acc")
    assert not reader.fallbacks and reader.taken["history-bulk"] == 1


def test_bulk_interval_endpoint_returns_the_public_histories(live):
    client, _, run_ids = live
    reader = Reader(client)
    short = run_ids[:-1]
    same_histories(reader.interval_histories(short, "val/acc"), client, short, "val/acc")
    assert not reader.fallbacks and "public-history" not in reader.taken
    # the long run is sampled by the endpoint: it is read in full through the public API
    same_histories(reader.interval_histories(run_ids, "val/acc"), client, run_ids, "val/acc")
    assert reader.taken["public-history"] == 1


def test_filter_parser():
    assert parse_filter("metrics.`val/acc` > 0.5 and tags.`mlexp.init` = 'scratch'") is True
    with pytest.raises(MlflowException):
        parse_filter("params.lr = 0.001")  # unquoted param value


# --- the SQL store's bulk query ------------------------------------------------------------------------------
def test_sqlite_store_bulk_query_returns_the_public_histories(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    run_ids = populate(client, "internals-sqlite")
    for key in ("val/acc", "train/acc", "no/such-key"):
        reader = Reader(client)
        same_histories(reader.histories(run_ids, key), client, run_ids, key)
        assert_taken(reader, "store-history-bulk", times=1)
    reader = Reader(client)
    runs, histories = fetch_runs(client, [experiment_id(client, "internals-sqlite")], None, ("val/acc",),
                                 reader=reader)
    assert {run.run_id for run in runs} == set(run_ids)
    assert histories["val/acc"] == public_histories(client, run_ids, "val/acc")
    assert reader.taken["store-history-bulk"] == 1 and reader.taken["public-search"] == 1


def test_a_store_without_the_bulk_query_is_read_through_the_public_api(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
    run_ids = populate(client, "internals-files")
    reader = Reader(client)
    same_histories(reader.histories(run_ids, "val/acc"), client, run_ids, "val/acc")
    assert reader.taken == {"public-history": 1}
    assert reader.fallbacks and "get_metric_history_bulk" in reader.fallbacks[0]


# --- doors that are missing or answer something else: a real proxy in front of the real server -----------------
class Proxy:
    """Forwards to `upstream`, except the paths in `answers`: (status, body, content type) instead."""

    def __init__(self, upstream: str, answers: dict[str, tuple[int, bytes, str]]):
        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = next((a for prefix, a in answers.items() if self.path.startswith(prefix)), None)
                if answer is None:
                    connection = http.client.HTTPConnection(host, port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    connection.request(self.command, self.path, body or None, headers)
                    upstream_reply = connection.getresponse()
                    answer = (upstream_reply.status, upstream_reply.read(),
                              upstream_reply.getheader("Content-Type", "application/json"))
                    connection.close()
                status, data, content_type = answer
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(live):
    made: list[Proxy] = []

    def make(answers: dict[str, tuple[int, bytes, str]]) -> MlflowClient:
        made.append(Proxy(live[0].tracking_uri, answers))
        return MlflowClient(made[-1].uri)

    yield make
    for each in made:
        each.close()


def test_without_the_ui_route_the_interval_endpoint_answers(live, proxy):
    client, experiment, run_ids = live
    through = proxy({"/ajax-api/": (404, b"Not Found", "text/plain")})  # a proxy forwarding /api/ only
    reader = Reader(through)
    runs, histories = fetch_runs(through, [experiment], None, ("val/acc",), reader=reader)
    assert histories["val/acc"] == public_histories(client, run_ids, "val/acc")
    assert reader.taken["history-bulk-interval"] == 1 and reader.taken["rest-search"] == 1
    assert len(reader.fallbacks) == 1 and "history-bulk: " in reader.fallbacks[0] and "404" in reader.fallbacks[0]


def test_unexpected_answers_fall_back_to_the_public_api(live, proxy):
    client, experiment, run_ids = live
    through = proxy({"/ajax-api/": (200, HTML, "text/html"),  # e.g. a login page or a web app's catch-all
                     "/api/2.0/mlflow/metrics/get-history-bulk-interval": (400, b'{"error_code": "BAD"}',
                                                                            "application/json")})
    reader = Reader(through)
    same_histories(reader.histories(run_ids, "val/acc"), client, run_ids, "val/acc")
    same_histories(reader.histories(run_ids, "val/loss"), client, run_ids, "val/loss")
    assert reader.taken == {"public-history": 2}  # each closed door is tried once only
    assert [why.split(":")[0] for why in reader.fallbacks] == ["history-bulk", "history-bulk-interval"]
    assert "other than JSON" in reader.fallbacks[0] and "HTTP 400" in reader.fallbacks[1]
