"""The durable outbox: everything a run sends to MLflow is written here first.

One folder per run under `outbox_root()`: `outbox.db` (SQLite in WAL mode) and `files/`
(artifact folders the outbox owns until the server has them). A write is committed before
the call returns, so a SIGKILL loses nothing that was logged; the sender deletes a row only
after the server has confirmed it. `synchronous=NORMAL` makes a commit durable against a
crashed or killed process (not against a power cut) without an fsync per commit; the
benchmark measures FULL against it (`benchmarks/tracking_overhead.py --outbox-sync full`).

Rows:
- `run`: one row saying which MLflow run this is (or will be, for an offline run), where
  it goes, and the status the server still has to be told.
- `records`: params, tags and metric points with their original timestamps, in order.
- `files`: artifact uploads, deletions and checkpoint manifests, in order.
- `kv`: what a resume needs before the server has it (the effective config, the newest
  checkpoint).
- `max_steps`: the highest step ever recorded per metric, so a resumed run logs no step twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from mlexp.credentials import redact
from mlexp.tracking.locks import fork_safe_locks
from mlexp.tracking.outbox_info import Pending, RunInfo
from mlexp.tracking.private_files import PRIVATE_FILE, private_folder, private_tree

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    local_id TEXT NOT NULL, run_id TEXT, tracking_uri TEXT, experiment TEXT, experiment_id TEXT,
    run_name TEXT, parent_local_id TEXT, tags TEXT, start_time INTEGER, offline INTEGER,
    status TEXT, end_time INTEGER, status_sent INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL, text TEXT,
    num REAL, timestamp INTEGER, step INTEGER);
CREATE INDEX IF NOT EXISTS records_by_key ON records (kind, key);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, local_path TEXT, artifact_path TEXT,
    bytes INTEGER NOT NULL DEFAULT 0, after_seq INTEGER NOT NULL DEFAULT 0, meta TEXT);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS max_steps (key TEXT PRIMARY KEY, step INTEGER);
"""

TERMINAL = ("FINISHED", "FAILED", "KILLED")


def outbox_root() -> Path:
    """$MLEXP_OUTBOX_DIR, else $XDG_DATA_HOME/mlexp/outbox (default ~/.local/share/mlexp/outbox)."""
    if os.environ.get("MLEXP_OUTBOX_DIR"):
        return Path(os.environ["MLEXP_OUTBOX_DIR"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "mlexp" / "outbox"


def new_local_id() -> str:
    """An id in MLflow's own run-id format, for runs recorded before the server knows them."""
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """One run's outbox. Thread-safe: every thread gets its own SQLite connection."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files_dir = self.folder / "files"
        self.db_path = self.folder / "outbox.db"
        self._local = threading.local()
        self._lock_file = None
        self._creating = False
        # The file operation this process's sender is carrying out: never dropped as superseded.
        self._claim = threading.Lock()
        self._in_flight: int | None = None

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def create(cls, local_id: str, *, run_id: str | None, tracking_uri: str | None, experiment: str | None,
               experiment_id: str | None, run_name: str | None, parent_local_id: str | None = None,
               tags: dict[str, str] | None = None, offline: bool = False) -> "Outbox":
        """The outbox of a run, created if new (an existing one is reopened as it is)."""
        box = cls(outbox_root() / local_id)
        private_folder(box.files_dir, outbox_root())
        if not box.db_path.exists():  # SQLite gives its -wal and -shm files the database file's mode
            os.close(os.open(box.db_path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
            os.chmod(box.db_path, PRIVATE_FILE)  # whatever the umask
        box._creating = True
        with box.transaction() as db:
            db.execute("INSERT OR IGNORE INTO run (id, local_id, run_id, tracking_uri, experiment, experiment_id, "
                       "run_name, parent_local_id, tags, start_time, offline, status, status_sent) "
                       "VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'RUNNING', 1)",
                       (local_id, run_id, redact(tracking_uri), experiment, experiment_id, run_name, parent_local_id,
                        json.dumps(tags or {}), now_ms(), int(offline)))
        return box

    @classmethod
    def find(cls, run_or_local_id: str) -> "Outbox | None":
        """The outbox whose local id or MLflow run id is this, if one is on this machine."""
        direct = outbox_root() / run_or_local_id
        if (direct / "outbox.db").is_file():
            box = cls(direct)
            try:
                box.info()
                return box
            except (sqlite3.Error, FileNotFoundError):
                return None  # half-made by a kill inside `create`: nothing was recorded in it
        for box in all_outboxes():
            if box.info().run_id == run_or_local_id:
                return box
        return None

    def connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if not self.db_path.is_file() and not self._creating:
                raise FileNotFoundError(f"no outbox at {self.folder}")  # removed once delivered: never recreate it
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={os.environ.get('MLEXP_OUTBOX_SYNC', 'NORMAL')}")
            db.executescript(SCHEMA)
            self._local.db = db
        return db

    class _Transaction:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            if self.db.in_transaction:  # an interrupt (Ctrl-C) landed between BEGIN and COMMIT last time
                self.db.execute("ROLLBACK")
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, error, trace) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def transaction(self) -> "_Transaction":
        return self._Transaction(self.connection())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- the owner's lock: one live process sends a run at a time ---------------------------
    def try_lock(self) -> bool:
        """Hold the run's lock for this process's life (released by the OS if it dies)."""
        if self._lock_file is not None:
            return True
        handle = open(self.folder / "lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle
        fork_safe_locks.add(handle)
        return True

    def unlock(self) -> None:
        if self._lock_file is not None:
            fork_safe_locks.discard(self._lock_file)
            self._lock_file.close()
            self._lock_file = None

    def holder_pid(self) -> str:
        try:
            return (self.folder / "lock").read_text().strip() or "?"
        except OSError:
            return "?"

    # --- the run row --------------------------------------------------------------------------
    def info(self) -> RunInfo:
        row = self.connection().execute(
            "SELECT local_id, run_id, tracking_uri, experiment, experiment_id, run_name, parent_local_id, tags, "
            "start_time, offline, status, end_time, status_sent FROM run WHERE id = 1").fetchone()
        if row is None:
            raise FileNotFoundError(f"{self.db_path} holds no run")
        return RunInfo(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7] or "{}"),
                       row[8], bool(row[9]), row[10], row[11], bool(row[12]))

    def set_server_run(self, run_id: str, tracking_uri: str, experiment_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE run SET run_id = ?, tracking_uri = ?, experiment_id = ? WHERE id = 1",
                       (run_id, redact(tracking_uri), experiment_id))

    def set_status(self, status: str) -> None:
        """The status the server must end up with (sent once everything before it is)."""
        end_time = now_ms() if status in TERMINAL else None
        with self.transaction() as db:
            db.execute("UPDATE run SET status = ?, end_time = ?, status_sent = 0 WHERE id = 1", (status, end_time))

    def mark_status_sent(self, status: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE run SET status_sent = 1 WHERE id = 1 AND status = ?", (status,))

    # --- writing (the training side) ---------------------------------------------------------
    def add_metrics(self, points: list[tuple[str, float, int, int]]) -> None:
        """(key, value, timestamp ms, step) points; one transaction, durable when this returns.

        SQLite has no NaN (it would store NULL): a value that is not finite is kept as text.
        """
        rows = [(key, value, None, timestamp, step) if math.isfinite(value) else
                (key, None, repr(value), timestamp, step) for key, value, timestamp, step in points]
        with self.transaction() as db:
            db.executemany("INSERT INTO records (kind, key, num, text, timestamp, step) "
                           "VALUES ('metric', ?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT INTO max_steps (key, step) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                           "step = max(step, excluded.step)", [(key, step) for key, _, _, step in points])

    def add_texts(self, kind: str, values: dict[str, str], replace: bool = False) -> None:
        """Params or tags. `replace`: drop unsent rows of the same keys first (a heartbeat)."""
        with self.transaction() as db:
            if replace:
                db.executemany("DELETE FROM records WHERE kind = ? AND key = ?", [(kind, k) for k in values])
            db.executemany("INSERT INTO records (kind, key, text) VALUES (?, ?, ?)",
                           [(kind, key, str(value)) for key, value in values.items()])

    def max_steps(self) -> dict[str, int]:
        return dict(self.connection().execute("SELECT key, step FROM max_steps").fetchall())

    def staging_dir(self, name: str) -> Path:
        """A fresh folder inside the outbox: write artifacts here and no copy is ever made."""
        folder = self.files_dir / f"{uuid.uuid4().hex[:12]}-{name}"
        folder.mkdir(parents=True)
        return folder

    def add_upload(self, local_dir: Path, artifact_path: str, *, op: str = "upload", after_seq: int = 0,
                   meta: dict | None = None) -> int:
        """Take ownership of `local_dir` (moved into the outbox unless already there) to upload it."""
        local_dir = Path(local_dir)
        if self.files_dir.resolve() not in local_dir.resolve().parents:
            target = self.staging_dir(local_dir.name)
            target.rmdir()
            shutil.move(str(local_dir), target)
            local_dir = target
        private_tree(local_dir)
        size = sum(p.stat().st_size for p in local_dir.rglob("*") if p.is_file())
        with self.transaction() as db:
            cursor = db.execute("INSERT INTO files (op, local_path, artifact_path, bytes, after_seq, meta) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (op, str(local_dir), artifact_path, size, after_seq,
                                                             json.dumps(meta or {})))
            return int(cursor.lastrowid)

    def add_operation(self, op: str, meta: dict, after_seq: int = 0) -> int:
        """An operation with no files of its own (inputs, metric links), in the files' order."""
        with self.transaction() as db:
            cursor = db.execute("INSERT INTO files (op, local_path, artifact_path, bytes, after_seq, meta) "
                                "VALUES (?, NULL, '', 0, ?, ?)", (op, after_seq, json.dumps(meta)))
            return int(cursor.lastrowid)

    def drop_superseded(self, artifact_prefix: str, keep_newest: bool = False) -> None:
        """Forget unsent uploads under `artifact_prefix` that a newer one replaces (an older
        epoch's checkpoint not sent yet: an outage, or uploads spaced out while training), so
        the outbox holds one, not one per epoch. `keep_newest`: the newest one stays (it was
        queued first, so no kill in between can leave none). The operation the sender is
        carrying out is left alone."""
        with self._claim, self.transaction() as db:
            rows = db.execute("SELECT seq, local_path FROM files WHERE artifact_path LIKE ? AND seq != ? "
                              "ORDER BY seq", (artifact_prefix + "%", self._in_flight or -1)).fetchall()
            if keep_newest:
                rows = rows[:-1]
            db.executemany("DELETE FROM files WHERE seq = ?", [(seq,) for seq, _ in rows])
        for _, local_path in rows:
            if local_path:
                shutil.rmtree(local_path, ignore_errors=True)

    def last_record_seq(self) -> int:
        return self.connection().execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]

    def put(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get(self, key: str, default: Any = None) -> Any:
        row = self.connection().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # --- reading (the sending side) -------------------------------------------------------------
    def next_records(self, limit: int) -> list[tuple]:
        return self.connection().execute("SELECT seq, kind, key, text, num, timestamp, step FROM records "
                                         "ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def delete_records(self, seqs: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in seqs])

    def reject(self, what: str, reason: str) -> None:
        """The server refused this for good (e.g. a param changed): kept here whole (`what` is the
        row as JSON, timestamp and step included), reported, never retried."""
        with self.transaction() as db:
            db.execute("INSERT INTO rejected (what, reason) VALUES (?, ?)", (what, reason))

    def next_file_op(self) -> tuple | None:
        return self.connection().execute("SELECT seq, op, local_path, artifact_path, after_seq, meta FROM files "
                                         "ORDER BY seq LIMIT 1").fetchone()

    def claim_file_op(self, seq: int) -> bool:
        """Mark `seq` as being carried out (False: it was dropped as superseded meanwhile)."""
        with self._claim:
            if self.connection().execute("SELECT 1 FROM files WHERE seq = ?", (seq,)).fetchone() is None:
                return False
            self._in_flight = seq
            return True

    def release_file_op(self) -> None:
        with self._claim:
            self._in_flight = None

    def done_file_op(self, seq: int, local_path: str | None) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE seq = ?", (seq,))
        if local_path:  # the server has it now: the outbox's copy can go
            shutil.rmtree(local_path, ignore_errors=True)

    def records_before(self, seq: int) -> bool:
        """Whether any record up to `seq` is still unsent."""
        return self.connection().execute("SELECT 1 FROM records WHERE seq <= ? LIMIT 1", (seq,)).fetchone() is not None

    def pending(self) -> Pending:
        db = self.connection()
        metrics = db.execute("SELECT COUNT(*) FROM records WHERE kind = 'metric'").fetchone()[0]
        texts = db.execute("SELECT COUNT(*) FROM records WHERE kind != 'metric'").fetchone()[0]
        files, size = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files").fetchone()
        rejected = db.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
        info = self.info()
        status = info.status if not info.status_sent else None
        return Pending(metrics, texts, files, size, status, rejected)

    def rejected(self) -> list[tuple[str, str]]:
        return self.connection().execute("SELECT what, reason FROM rejected ORDER BY seq").fetchall()

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def remove(self) -> None:
        """Everything reached the server: the outbox goes (its lock last, so no other process
        opens a half-deleted folder)."""
        self.close()
        (self.folder / "outbox.db").unlink(missing_ok=True)
        for leftover in self.folder.iterdir():
            if leftover.name != "lock":
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        self.unlock()
        shutil.rmtree(self.folder, ignore_errors=True)


QUARANTINE = ".damaged-"  # a damaged outbox moved aside by `mlexp sync` (mlexp.tracking.damage)


def all_outboxes() -> Iterator[Outbox]:
    """Every readable outbox on this machine (a folder left half-made by a kill is skipped)."""
    root = outbox_root()
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if (folder / "outbox.db").is_file() and QUARANTINE not in folder.name:
            box = Outbox(folder)
            try:
                box.info()
            except (sqlite3.Error, FileNotFoundError):
                continue
            yield box


def outbox_unwritable(error: BaseException) -> bool:
    """Whether `error` says the outbox's disk cannot take a write: full, over quota or read-only
    (SQLite's "database or disk is full", an OSError, safetensors' IoError)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    text = str(error)
    return any(sign in text for sign in ("database or disk is full", "readonly database", "No space left",
                                         "StorageFull", "Read-only file system"))
