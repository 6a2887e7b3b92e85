"""Read runs and their metric histories from MLflow, fast (for `compare` and `monitor`).

The expensive part of comparing many runs is the per-epoch histories: one
`get_metric_history` call per run and key is 4,000 HTTP requests for 2,000 runs and two
curves (~30 s against a local server). `mlexp.analysis.mlflow_internals.Reader` reads runs as plain
JSON and histories through MLflow's bulk endpoints or the SQL store's bulk query, and falls
back to the public API where those are missing (that module says why each is used and how
much it saves). History requests for one page of runs go out on a thread pool while the
server searches the next page.

Python's cyclic garbage collector is paused while the results are built: it does no
useful work on these acyclic records and otherwise takes most of the time.
"""

# Imported where used: `mlflow` (about 1.4 s), because `mlexp --help`, the option checks and
# their one-line errors import this module and come before it.
from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mlexp.analysis.mlflow_internals import Reader, parse_filter
from mlexp.errors import MlexpError

FINISHED = "FINISHED"

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
                with_commas = [other for other in known if "," in other and name in other.split(",")[0]]
                hint = (f"; a name with commas is written as a JSON list: --experiment '{json.dumps(with_commas[:1])}'"
                        if with_commas else "")
                raise MlexpError(f"no MLflow experiment {name!r} at {client.tracking_uri}; existing "
                                 f"experiments: {json.dumps(known) if with_commas else ', '.join(known) or 'none'}{hint}")
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
               reader: Reader | None = None) -> tuple[list[RunRecord], Histories]:
    """All active runs of the experiments matching the filter, and the histories of
    `history_keys` for the runs `wants_history` selects. User errors raise MlexpError.
    `reader`: the Reader to use (it records which doors answered); a new one by default."""
    from mlflow.exceptions import MlflowException

    check_filter(filter_string)
    reader = reader or Reader(client)
    runs: list[RunRecord] = []
    pending: list[tuple[str, Future]] = []
    histories: Histories = {key: {} for key in history_keys}
    try:
        with gc_paused(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="mlexp-history") as pool:
            token = None
            while True:
                page, token = reader.search_page(experiment_ids, filter_string, token)
                records = [RunRecord(**fields) for fields in page]
                runs.extend(records)
                wanted = [run for run in records if wants_history(run)]
                for key in history_keys:  # a run has a history of the keys it has a latest value of
                    run_ids = [run.run_id for run in wanted if key in run.metrics]
                    for start in range(0, len(run_ids), reader.batch_size):
                        batch = run_ids[start:start + reader.batch_size]
                        pending.append((key, pool.submit(reader.histories, batch, key)))
                if not token:
                    break
            for key, future in pending:
                histories[key].update(future.result())
    except MlflowException as error:
        message = one_line(error)
        if filter_string and error.error_code == "INVALID_PARAMETER_VALUE":
            raise MlexpError(f"MLflow rejected the filter {filter_string!r}: {message}") from None
        raise MlexpError(f"cannot search runs at {client.tracking_uri}: {message}") from None
    for per_run in histories.values():
        for points in per_run.values():
            points.sort()
    return runs, histories


def read_histories(reader: Reader, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    """One more key's histories, for runs already fetched: in the reader's batches (a server
    takes at most 100 runs a request), sorted by step as fetch_runs sorts them."""
    from mlflow.exceptions import MlflowException

    found: dict[str, list[tuple[int, float]]] = {}
    try:
        with gc_paused():
            for start in range(0, len(run_ids), reader.batch_size):
                found.update(reader.histories(run_ids[start:start + reader.batch_size], key))
    except MlflowException as error:
        raise MlexpError(f"cannot read the {key} histories at {reader.client.tracking_uri}: {one_line(error)}") from None
    for points in found.values():
        points.sort()
    return found


def check_filter(filter_string: str | None) -> None:
    """Parse the filter as MLflow will, so a typo is reported the same way on every store."""
    from mlflow.exceptions import MlflowException

    if not filter_string:
        return
    try:
        parse_filter(filter_string)
    except MlflowException as error:
        raise MlexpError(f"MLflow rejected the filter {filter_string!r}: {one_line(error)} (syntax: "
                         "metrics.`val/acc` > 0.9 and params.lr = '0.001' and tags.`mlexp.init` = 'scratch')"
                         ) from None


def latest_step(histories: Histories, run_id: str, *keys: str) -> int:
    """The highest step logged for the first of `keys` that has any points (0 if none)."""
    for key in keys:
        points = histories.get(key, {}).get(run_id)
        if points:
            return points[-1][0]
    return 0
