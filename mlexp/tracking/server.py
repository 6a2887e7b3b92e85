"""The MLflow side of the seam: the only code in mlexp that calls MLflow's write API.

Every request is bounded: MLflow's client would retry one failing HTTP request for about
12 minutes (7 retries with exponential backoff), holding back everything behind it. mlexp
asks for at most one quick retry and a 30 s socket timeout, and the outbox's sender does
its own backoff, with no limit while the run lives.
"""

# Imported where used: `mlflow` (about 1.4 s) and `sqlalchemy`, because `mlexp --help`, the
# option checks and their one-line errors import this module and come before it.
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import posixpath
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from mlexp.credentials import redact
from mlexp.errors import MlexpError

# MLflow reads these at every request; set before the first one.
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = os.environ.get("MLEXP_HTTP_RETRIES", "1")
os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = os.environ.get("MLEXP_HTTP_TIMEOUT_S", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # checkpoint reads are not news
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # mlexp says where the run is itself

MAX_METRICS_PER_REQUEST = 1000
MAX_TEXTS_PER_REQUEST = 100  # params and tags, each
MANIFEST = "manifest.json"
# Errors that no retry can fix: the run is gone, or a value is refused (a changed param).
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
# The experiment kind MLflow 3's UI reads to open an experiment on its runs, not the GenAI view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in the current folder (MLflow 3's default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when the store cannot be used at all."""
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri[len("sqlite:///"):])
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(store.parent, os.W_OK) or (store.exists() and not os.access(store, os.W_OK)):
                raise PermissionError("not writable")
        except OSError as error:
            raise MlexpError(f"cannot create the MLflow tracking store {tracking_uri} "
                             f"({error.strerror or error}); pass a --tracking-uri in a folder you can write, "
                             "or --offline") from None
        create_sqlite_store(tracking_uri, store)
        return
    if tracking_uri.startswith(DATABASE_SCHEMES):
        check_database(tracking_uri, timeout_s)
        return
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
                         "start it (`mlflow server --host 127.0.0.1 --port 5000`), pass another "
                         "--tracking-uri, or train with --offline and `mlexp sync` later") from None


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def check_database(tracking_uri: str, timeout_s: float) -> None:
    """A database store answers one connection, or the reason is one line (its password masked):
    MLflow itself would retry for a minute, printing a warning each time, then a traceback."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(tracking_uri, connect_args={"connect_timeout": int(timeout_s)}
                                      if tracking_uri.startswith("postgresql") else {})
    try:
        with engine.connect():
            return
    except Exception as error:  # noqa: BLE001 - any failure to connect is the same answer to the user
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        raise MlexpError(f"cannot connect to the MLflow tracking store {redact(tracking_uri)} ({redact(reason)}); "
                         "check its address, user and password") from None
    finally:
        engine.dispose()


def file_sha256(path: Path) -> str:
    """A file's sha256, read in blocks: what checkpoint manifests and weights provenance record."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_sqlite_store(tracking_uri: str, store: Path) -> None:
    """Create a new SQLite store under a file lock: MLflow's schema creation is not safe when
    two processes start on a new store at once (two launchers: "table ... already exists")."""
    if store.exists() and store.stat().st_size > 0:
        return
    with open(store.parent / f".{store.name}.mlexp-create.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not store.exists() or store.stat().st_size == 0:
            client_for(tracking_uri).search_experiments(max_results=1)  # creates the tables


def client_for(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def error_code(error: BaseException) -> str | None:
    return getattr(error, "error_code", None)


def is_permanent(error: BaseException) -> bool:
    """Refused for good (retrying cannot help), as opposed to the server being away or busy."""
    return error_code(error) in PERMANENT_CODES and "database is locked" not in str(error)


LOCKED_WAIT_S = 120.0
_told_locked = False


def retry_when_locked(call: Callable[[], Any], wait_s: float = LOCKED_WAIT_S) -> Any:
    """`call()`, retried while a SQLite store answers "database is locked" (several processes
    writing one file: a parallel sweep on one machine). The run goes on; the user is told once
    that a shared server is the tool for many writers."""
    global _told_locked
    deadline, delay = time.monotonic() + wait_s, 0.2
    while True:
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - only the lock is retried here
            if "database is locked" not in str(error) or time.monotonic() > deadline:
                raise
        if not _told_locked:
            _told_locked = True
            print("mlexp: the SQLite tracking store is busy (database is locked); retrying. SQLite is for one "
                  "machine and a few writers: for parallel sweeps and teams use an `mlflow server` "
                  "(README: a team server on PostgreSQL)", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(2 * delay, 2.0)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


# --- experiments and runs -------------------------------------------------------------------
def experiment_id_for(client, name: str) -> str:
    """The experiment's id, creating it (for the runs view) if needed; safe when two processes race."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return retry_when_locked(lambda: client.create_experiment(name, tags=EXPERIMENT_KIND))
        except MlflowException:
            found = client.get_experiment_by_name(name)  # another process created it first
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise MlexpError(f"the MLflow experiment {name!r} was deleted; restore it with `mlflow experiments "
                         f"restore --experiment-id {found.experiment_id}` (and the same --tracking-uri), "
                         "or pass another --experiment name")
    return found.experiment_id


def create_run(client, experiment_id: str, run_name: str | None, tags: dict[str, str],
               start_time: int | None = None) -> str:
    all_tags = dict(tags)
    if run_name:
        all_tags["mlflow.runName"] = run_name
    return retry_when_locked(lambda: client.create_run(experiment_id, start_time=start_time, run_name=run_name,
                                                       tags=all_tags)).info.run_id


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    retry_when_locked(lambda: client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()]))


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        retry_when_locked(lambda key=key, value=value: client.set_tag(run_id, key, value))


def find_run_by_local_id(client, local_id: str, experiment_id: str | None = None) -> str | None:
    """The server run that an offline run became at an earlier sync (tag mlexp.local_id)."""
    if experiment_id is None:
        ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    else:
        ids = [experiment_id]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string=f"tags.`mlexp.local_id` = '{local_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def set_status(client, run_id: str, status: str, end_time: int | None) -> None:
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
        return
    client.set_terminated(run_id, status, end_time=end_time)
    if status == "FINISHED":  # an earlier failure (or a reap) of this run was resumed and made good
        run = client.get_run(run_id)
        for tag in ("mlexp.error", "mlexp.reaped", "mlexp.last_problem"):
            if tag in run.data.tags:
                client.delete_tag(run_id, tag)


# --- records ----------------------------------------------------------------------------------
def send_records(client, run_id: str, rows: list[tuple]) -> None:
    """One log_batch of outbox rows (seq, kind, key, text, num, timestamp, step).

    A key appears once per request (MLflow refuses duplicates): for a tag the last value wins,
    as it would over separate requests; `batch_of` never puts a param twice in one request.
    """
    from mlflow.entities import Metric, Param, RunTag

    metrics = [Metric(key, num if num is not None else float(text), timestamp, step)
               for _, kind, key, text, num, timestamp, step in rows if kind == "metric"]
    params = {key: text for _, kind, key, text, *_ in rows if kind == "param"}
    tags = {key: text for _, kind, key, text, *_ in rows if kind == "tag"}
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])


RECORD_KINDS = ("metric", "param", "tag")


def malformed(row: tuple) -> str | None:
    """Why an outbox row (seq, kind, key, text, num, timestamp, step) can never be sent, if it
    cannot (a damaged outbox: an unknown kind, a metric that is not a number, no key); else None."""
    _, kind, key, text, num, timestamp, step = row
    if kind not in RECORD_KINDS:
        return f"unknown record kind {kind!r}"
    if not isinstance(key, str) or not key:
        return "no key"
    if kind == "metric":
        try:
            float(num if num is not None else text)
            int(timestamp), int(step)
        except (TypeError, ValueError):
            return f"metric {key!r} is not a number ({num if num is not None else text!r})"
    return None


def batch_of(rows: list[tuple]) -> list[tuple]:
    """The longest prefix of rows that fits one log_batch request.

    It ends before a param key it already holds: params are immutable, so the first value must
    reach the server first and a changed one be refused there (and kept aside), exactly as when
    the two were queued far apart; merged into one request, the first would vanish unseen.
    """
    counts = {"metric": 0, "param": 0, "tag": 0}
    limits = {"metric": MAX_METRICS_PER_REQUEST, "param": MAX_TEXTS_PER_REQUEST, "tag": MAX_TEXTS_PER_REQUEST}
    params = set()
    for index, (_, kind, key, *_) in enumerate(rows):
        counts[kind] += 1
        if counts[kind] > limits[kind] or sum(counts.values()) > MAX_METRICS_PER_REQUEST:
            return rows[:index]
        if kind == "param":
            if key in params:
                return rows[:index]
            params.add(key)
    return rows


# --- artifacts --------------------------------------------------------------------------------
def upload_folder(client, run_id: str, local_dir: Path, artifact_path: str,
                  before_file: Callable[[str], None] = lambda path: None,
                  on_block: Callable[[], None] = lambda: None) -> None:
    """Upload a folder file by file (a retry re-sends the whole folder: uploads overwrite)."""
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    repo = artifact_repo(client, run_id)
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        relative = path.relative_to(local_dir).parent.as_posix()
        target = "/".join(part for part in (artifact_path, relative) if part and part != ".")
        before_file("/".join(part for part in (target, path.name) if part))
        if isinstance(repo, HttpArtifactRepository) and not repo._should_multipart_upload(str(path)):
            put_in_large_blocks(repo, path, target, on_block)
        else:
            repo.log_artifact(str(path), target or None)


UPLOAD_BLOCK = 8 << 20


class LargeReads(io.FileIO):
    """A file whose reads return at least 8 MB. An HTTP upload then sends a few large blocks,
    each with the GIL released, instead of thousands of 16 KB ones that make the training
    thread wait for the GIL after every one. `on_block` hears of every block (progress)."""

    def __init__(self, path: Path, on_block: Callable[[], None]):
        super().__init__(path, "rb")
        self.on_block = on_block

    def read(self, size: int = -1) -> bytes:
        self.on_block()
        return super().read(-1 if size is None or size < 0 else max(size, UPLOAD_BLOCK))


def put_in_large_blocks(repo, path: Path, target: str, on_block: Callable[[], None]) -> None:
    """What MLflow's HttpArtifactRepository.log_artifact does, reading the file in large blocks."""
    from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

    endpoint = posixpath.join("/", *((target, path.name) if target else (path.name,)))
    with LargeReads(path, on_block) as body:
        response = http_request(repo._host_creds, endpoint, "PUT", data=body,
                                extra_headers={"Content-Type": "application/octet-stream"})
    augmented_raise_for_status(response)


def artifact_repo(client, run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)


def delete_artifacts(client, run_id: str, artifact_path: str) -> None:
    artifact_repo(client, run_id).delete_artifacts(artifact_path)


def artifact_exists(client, run_id: str, artifact_path: str) -> bool:
    """Whether the run has a file at this path (a failed listing is an error, not a no)."""
    parent, _, name = artifact_path.rpartition("/")
    return any(item.path.rsplit("/", 1)[-1] == name and not item.is_dir
               for item in client.list_artifacts(run_id, parent or None))


def read_json_artifact(client, run_id: str, artifact_path: str) -> Any | None:
    """A small JSON artifact, or None when the run has none at that path."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="mlexp-read-") as folder:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=folder,
                                                       tracking_uri=client.tracking_uri)
        except (MlflowException, OSError):
            return None
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None


def download(client, run_id: str, artifact_path: str, target: Path) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(target), tracking_uri=client.tracking_uri))


def publish_manifest(client, run_id: str, local_dir: Path, artifact_path: str) -> bool:
    """Make a checkpoint visible: upload its manifest last, then prune older epoch folders.

    A manifest older than the one the server has (a stale outbox synced late) is not
    published, and its own folder is removed. Returns whether it was published.
    """
    manifest = json.loads((Path(local_dir) / MANIFEST).read_text())
    current = read_json_artifact(client, run_id, f"{artifact_path}/{MANIFEST}")
    if current and current.get("epoch", -1) > manifest["epoch"]:
        delete_artifacts(client, run_id, f"{artifact_path}/{manifest['folder']}")
        return False
    client.log_artifact(run_id, str(Path(local_dir) / MANIFEST), artifact_path)
    for item in client.list_artifacts(run_id, artifact_path):
        name = item.path.rsplit("/", 1)[-1]
        if item.is_dir and name != manifest["folder"]:
            delete_artifacts(client, run_id, item.path)
    return True
