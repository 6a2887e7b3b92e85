"""The sender: drains one run's outbox to MLflow in the background.

Two lanes, each a thread that keeps its own order: records (params, tags, metric points,
batched into `log_batch` requests) and files (uploads, checkpoint manifests, deletions).
Metric points never wait behind a checkpoint upload. A checkpoint's manifest waits only for
the records logged before it, so a resume never starts from a checkpoint whose metrics the
server lacks. The run's final status is sent last, once both lanes are empty.

While the run trains, checkpoints that a newer one replaces (`checkpoints/last/`, `best/`)
go up at most once per `MLEXP_CHECKPOINT_UPLOAD_S` (60 s; 0: every epoch): with short
epochs most of them would be overwritten on the server before anyone read them, and each
costs the training CPU time (~0.7 s per 190 MB to a server on the same machine). Waiting
ones are kept whole in the outbox (a resume on this machine uses the newest); a newer
one replaces an older one there; at the run's end everything goes.

A failed request is retried after a capped exponential backoff (0.5 s doubling to 30 s),
with no limit while the run lives. Once the run has ended and only waits for the server
(its grace period, `mlexp sync`), a sleeping lane retries at once and then every 2 s: a
server that comes back during the wait must not be missed behind a 30 s backoff. The user is told once when the server goes away and
once when it is back, with what was waiting.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from mlexp.errors import MlexpError
from mlexp.faults import crash_point
from mlexp.tracking import lineage, server
from mlexp.tracking.outbox import Outbox, outbox_unwritable

SEND_INTERVAL_S = 2.0
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
DRAINING_RETRY_S = 2.0  # the backoff cap while the run's end waits only for the server
READ_ROWS = 1000  # one request's worth (server.MAX_METRICS_PER_REQUEST): rows read and dropped unsent are garbage
SPACED_OUT = ("checkpoints/last", "checkpoints/best")  # replaced by each newer checkpoint


def seconds_from_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise MlexpError(f"${name} must be a number of seconds, got {os.environ[name]!r}") from None


def checkpoint_upload_s() -> float:
    return seconds_from_env("MLEXP_CHECKPOINT_UPLOAD_S", 60.0)


def lower_this_threads_priority() -> None:
    """Sending is I/O; training is compute. On Linux a thread has its own nice value: give the
    training threads the CPU first (a niced thread still gets its share, it never starves)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def say(message: str) -> None:
    print(f"mlexp: {message}", file=sys.stderr, flush=True)


class Health:
    """Whether the server answers; says so once per outage, not once per failed request.

    A failure is news only once it has lasted NOTICE_AFTER_S: a single refused request, or a
    server flapping while it shuts down, is retried without a word.
    """

    NOTICE_AFTER_S = 3.0

    def __init__(self, outbox: Outbox, tracking_uri: str, quiet: bool = False):
        self.outbox, self.tracking_uri, self.quiet = outbox, tracking_uri, quiet
        self.failing_since: float | None = None
        self.announced = False
        self.last_error = ""
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.last_error = server.first_line(error)
            now = time.monotonic()
            if self.failing_since is None:
                self.failing_since = now
            # The outbox's own disk refusing (full, read-only) is not the server's doing: the
            # training's writes meet it too, and the run ends saying so in one line.
            if outbox_unwritable(error):
                return
            if not self.announced and now - self.failing_since >= self.NOTICE_AFTER_S:
                self.announced = True
                if not self.quiet:
                    say(f"the tracking server at {self.tracking_uri} is not taking writes ({self.last_error}); "
                        f"training goes on and everything waits in {self.outbox.folder}")

    def ok(self) -> None:
        with self._lock:
            if self.failing_since is None:
                return
            away, announced = time.monotonic() - self.failing_since, self.announced
            self.failing_since, self.announced = None, False
            if announced and not self.quiet:
                say(f"the tracking server is back after {away:.0f} s; sending what waited: "
                    f"{self.outbox.pending().describe()}")


class Sender:
    """Sends one outbox to one MLflow run until stopped."""

    def __init__(self, outbox: Outbox, client, run_id: str, quiet: bool = False, training: bool = False):
        self.outbox, self.client, self.run_id = outbox, client, run_id
        self.health = Health(outbox, client.tracking_uri, quiet)
        self._wakes = {"records": threading.Event(), "files": threading.Event()}
        self._stop = threading.Event()
        self._draining = threading.Event()  # the run ended: everything left waits only for the server
        self._status_lock = threading.Lock()
        self.activity = time.monotonic()  # the last time anything moved (for `mlexp sync`'s patience)
        self.checkpoint_upload_s = checkpoint_upload_s() if training else 0.0  # `mlexp sync`: everything now
        self._checkpoints_sent_at = time.monotonic()  # the first one waits a period too
        self._sending_checkpoint = False  # inside one checkpoint's uploads (best, last, manifest)
        self._threads = [threading.Thread(target=self._lane, args=(name, step), name=f"mlexp-{name}", daemon=True)
                         for name, step in (("records", self._records_step), ("files", self._files_step))]

    def start(self) -> "Sender":
        for thread in self._threads:
            thread.start()
        return self

    def wake(self) -> None:
        for event in self._wakes.values():
            event.set()

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (True) or the time is up (False)."""
        deadline = time.monotonic() + timeout_s
        self._draining.set()
        while not self.outbox.pending().empty:
            if time.monotonic() >= deadline:
                return False
            self.wake()
            time.sleep(0.05)
        return True

    def stop(self, join_s: float = 5.0) -> None:
        """Stop both lanes; a request in flight is abandoned, its row stays for a later send."""
        self._stop.set()
        self._draining.set()
        self.wake()
        for thread in self._threads:
            thread.join(join_s)

    # --- the lanes ------------------------------------------------------------------------------
    def _lane(self, name: str, step) -> None:
        lower_this_threads_priority()
        wake, failures = self._wakes[name], 0
        while not self._stop.is_set():
            try:
                progressed = step()
                failures = 0
            except Exception as error:  # noqa: BLE001 - the server's trouble never reaches training
                failures += 1
                self.health.failed(error)
                delay = min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
                if self._draining.is_set():
                    self._stop.wait(min(delay, DRAINING_RETRY_S))
                else:
                    self._draining.wait(delay)  # a long backoff ends early when the run starts draining
                continue
            if not progressed:
                wake.wait(SEND_INTERVAL_S)
                wake.clear()

    def _records_step(self) -> bool:
        read = self.outbox.next_records(READ_ROWS)
        rows = server.batch_of(self._well_formed(read))
        if rows:
            self._send_rows(rows)
            self.activity = time.monotonic()
            self.health.ok()
            self._wakes["files"].set()  # a manifest may have been waiting for these
            # A full batch: more are waiting. Otherwise collect for SEND_INTERVAL_S (fewer,
            # larger requests) unless woken (a heartbeat, the end of the run).
            return len(rows) >= server.MAX_METRICS_PER_REQUEST
        if read:  # only malformed rows, now kept aside: the next ones at once
            return True
        return self._send_status()

    def _well_formed(self, rows: list[tuple]) -> list[tuple]:
        """The rows that can be sent; one that never can (a damaged outbox) is kept aside with its
        reason, so it does not hold back every record behind it."""
        good = []
        for row in rows:
            reason = server.malformed(row)
            if reason is None:
                good.append(row)
                continue
            self.outbox.reject(json.dumps(dict(zip(("seq", "kind", "key", "text", "num", "timestamp", "step"), row)),
                                          default=str), f"malformed record: {reason}")
            self.outbox.delete_records([row[0]])
        return good

    def _send_rows(self, rows: list[tuple]) -> None:
        try:
            server.send_records(self.client, self.run_id, rows)
        except Exception as error:
            if not server.is_permanent(error):
                raise
            # Refused for good: find the culprit(s) one by one, keep them aside, send the rest.
            for row in rows:
                try:
                    server.send_records(self.client, self.run_id, [row])
                except Exception as single:
                    if not server.is_permanent(single):
                        raise
                    self.outbox.reject(json.dumps(dict(zip(("seq", "kind", "key", "text", "num", "timestamp",
                                                            "step"), row))), server.first_line(single))
                self.outbox.delete_records([row[0]])
            return
        self.outbox.delete_records([row[0] for row in rows])

    def _send_status(self) -> bool:
        """The status, once everything before it is on the server (RUNNING needs no waiting)."""
        with self._status_lock:
            info = self.outbox.info()
            if info.status_sent or info.status is None:
                return False
            if info.status != "RUNNING" and self._has_other_pending():
                return False
            crash_point("status", info.status)
            server.set_status(self.client, self.run_id, info.status, info.end_time)
            self.health.ok()
            self.outbox.mark_status_sent(info.status)
            return True

    def _has_other_pending(self) -> bool:
        pending = self.outbox.pending()
        return bool(pending.metrics or pending.params_tags or pending.files)

    def _files_step(self) -> bool:
        op = self.outbox.next_file_op()
        if op is None or self._waits_for_its_period(op[3]):
            return False
        seq, kind, local_path, artifact_path, after_seq, meta = op
        if kind in ("manifest", "logged_model", "link_metrics") and self.outbox.records_before(after_seq):
            return False  # the metrics this checkpoint covers go first; the records lane wakes us
        if not self.outbox.claim_file_op(seq):
            return True  # replaced by a newer checkpoint meanwhile: look again
        try:
            done = self._carry_out(seq, kind, local_path, artifact_path, meta)
        finally:
            self.outbox.release_file_op()
        if kind == "manifest":  # a checkpoint's last operation done: the next one waits its period
            self._sending_checkpoint = False  # (a failed one is retried at once, in the same window)
        return done

    def _waits_for_its_period(self, artifact_path: str) -> bool:
        """Whether a replaceable checkpoint upload waits (see the module docstring). The files
        of one checkpoint (best, last, its manifest) go together, once its period has come."""
        if not artifact_path.startswith(SPACED_OUT) or self._draining.is_set() or self._sending_checkpoint:
            return False
        if time.monotonic() - self._checkpoints_sent_at < self.checkpoint_upload_s:
            return True
        self._checkpoints_sent_at, self._sending_checkpoint = time.monotonic(), True
        return False

    def _carry_out(self, seq: int, kind: str, local_path: str | None, artifact_path: str, meta: str) -> bool:
        try:
            if local_path and not Path(local_path).is_dir():  # never "deliver" an upload whose files are gone
                raise FileNotFoundError(f"the outbox's copy {local_path} is missing")
            if kind == "upload":
                server.upload_folder(self.client, self.run_id, Path(local_path), artifact_path,
                                     before_file=self._before_file, on_block=self._moved)
            elif kind == "manifest":
                crash_point("manifest", json.loads(meta).get("epoch"))
                server.publish_manifest(self.client, self.run_id, Path(local_path), artifact_path)
            elif kind == "logged_model":
                lineage.publish_logged_model(self.client, self.run_id, Path(local_path), json.loads(meta))
            elif kind == "inputs":
                described = json.loads(meta)
                lineage.log_inputs(self.client, self.run_id, described.get("splits", []), described.get("models", []))
            elif kind == "link_metrics":
                described = json.loads(meta)
                lineage.link_metrics(self.client, self.run_id, described["model_id"], described["metrics"],
                                    described.get("datasets", {}))
        except Exception as error:
            if not (server.is_permanent(error) or isinstance(error, FileNotFoundError)):
                raise
            self.outbox.reject(json.dumps({"op": kind, "artifact_path": artifact_path, "local_path": local_path}),
                               server.first_line(error))
            self.outbox.done_file_op(seq, None)  # kept aside with its files, never silently dropped
            return True
        self.health.ok()
        self.outbox.done_file_op(seq, local_path)
        self._wakes["records"].set()  # the status may be sendable now
        return True

    def _before_file(self, path: str) -> None:
        self._moved()
        crash_point("upload", path)

    def _moved(self) -> None:
        self.activity = time.monotonic()
