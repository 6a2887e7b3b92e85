"""`mlexp sync`: send what outboxes still hold (killed processes, outages, offline runs).

Idempotent: a metric point is re-sent with its original timestamp (MLflow's key for a point
includes it, so a point the server already has is not stored twice), params and tags are
re-sent with their values, uploads overwrite, and an offline run is found again on the
server by its `mlexp.local_id` tag instead of being created twice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from mlexp.config import DEFAULT_EXPERIMENT
from mlexp.credentials import MASK, redact
from mlexp.errors import MlexpError
from mlexp.tracking import server
from mlexp.tracking.damage import damaged_outboxes, rescue
from mlexp.tracking.outbox import Outbox, all_outboxes, outbox_root
from mlexp.tracking.outbox_info import Pending
from mlexp.tracking.sender import Sender


@dataclass
class SyncResult:
    run: str  # the run's name and id, for the report
    before: Pending
    after: Pending | None  # None: not attempted (dry run, live process)
    note: str = ""
    damaged: bool = False  # the outbox was damaged: reported, moved aside, its whole checkpoints sent

    @property
    def complete(self) -> bool:
        return self.after is not None and self.after.empty and not self.after.rejected

    def line(self) -> str:
        if self.damaged:
            return f"{self.run}: {self.note}"
        if self.after is None:
            return f"{self.run}: {self.note or 'would send ' + self.before.describe()}"
        if self.after.empty:
            return f"{self.run}: sent {self.before.describe()}{self.note}"
        return f"{self.run}: {self.after.describe()} still waiting{self.note}"


def stall_s() -> float:
    return float(os.environ.get("MLEXP_SYNC_STALL_S", "60"))


def chosen_outboxes(run: str | None, every: bool) -> list[Outbox]:
    if run:
        box = Outbox.find(run)
        if box is None:
            raise MlexpError(f"no outbox for run {run!r} in {outbox_root()}: nothing waits for it on this machine "
                             "(set $MLEXP_OUTBOX_DIR if it was recorded elsewhere)")
        return [box]
    if not every:
        raise MlexpError("say which: --run RUN_ID, or --all")
    boxes = list(all_outboxes())
    # Parents before their children: a child is created nested under its parent's server run.
    return sorted(boxes, key=lambda box: box.info().parent_local_id is not None)


def sync(run: str | None = None, every: bool = False, to: str | None = None, dry_run: bool = False,
         echo=print, verbose: bool = False) -> list[SyncResult]:
    results = []
    damaged = list(damaged_outboxes(run if not every else None)) if run or every else []
    for folder, problem in damaged:  # said first, never blocking the rest
        uri = to or os.environ.get("MLFLOW_TRACKING_URI") or server.default_tracking_uri()
        results.append(SyncResult(folder.name, Pending(0, 0, 0, 0, None, 0), None,
                                  rescue(folder, problem, uri, dry_run).split(": ", 1)[1], damaged=True))
        echo(results[-1].line())
    boxes = [] if run and damaged else [box for box in chosen_outboxes(run, every) if box.folder.is_dir()]
    for box in boxes:
        try:
            result = sync_outbox(box, to, dry_run, quiet=not verbose)
        except Exception as error:  # noqa: BLE001 - one outbox's trouble is said on its line, the others still go
            if len(boxes) == 1 and isinstance(error, MlexpError):
                raise
            reason = str(error) if isinstance(error, MlexpError) else f"{type(error).__name__}: {server.first_line(error)}"
            result = SyncResult(safe_label(box), Pending(0, 0, 0, 0, None, 0), None, f"not sent ({reason})")
            result.damaged = True
        echo(result.line())
        results.append(result)
    if not results:
        echo(f"nothing to sync: no outbox in {outbox_root()}")
    return results


def safe_label(box: Outbox) -> str:
    try:
        return label(box)
    except Exception:  # noqa: BLE001 - the outbox cannot even say its name: its folder does
        return box.folder.name


def label(box: Outbox) -> str:
    info = box.info()
    name = f"{info.run_name} " if info.run_name else ""
    return f"{name}({info.run_id or info.local_id}{', offline' if info.offline and not info.run_id else ''})"


def sync_outbox(box: Outbox, to: str | None, dry_run: bool, stall: float | None = None,
                quiet: bool = True) -> SyncResult:
    info = box.info()
    name = label(box)  # before the sync: an offline run is still named by its local id
    before = box.pending()
    if not box.try_lock():
        return SyncResult(name, before, None, f"being sent by its own live process (pid {box.holder_pid()})")
    try:
        if dry_run:
            refused = "".join(f"\n    refused: {what} ({reason})" for what, reason in box.rejected())
            return SyncResult(name, before, None,
                              f"would send {before.describe()} to {info.tracking_uri or to or '?'} "
                              f"({box.disk_bytes() / 1e6:.1f} MB on disk){refused}")
        uri = with_credentials(info.tracking_uri, to) if info.tracking_uri else to
        if uri is None:
            raise MlexpError(f"run {info.local_id} was recorded offline: say where to send it with --to URI")
        if to and info.tracking_uri and redact(to) != info.tracking_uri:
            raise MlexpError(f"run {info.run_id} belongs to {info.tracking_uri}; --to is for offline runs only")
        server.check_reachable(uri)
        client = server.client_for(uri)
        run_id = info.run_id or ensure_server_run(box, client, uri)
        sender = Sender(box, client, run_id, quiet=quiet).start()
        drain(box, sender, stall_s() if stall is None else stall)
        sender.stop()
        after = box.pending()
        note = f" -> run {run_id} at {uri}" if not info.run_id else ""
        if after.rejected:
            reasons = sorted({reason for _, reason in box.rejected()})
            note += (f"; {after.rejected} refused for good, kept in {box.db_path}: {'; '.join(reasons[:3])}"
                     + (f" and {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""))
        if not after.empty and sender.health.last_error:  # why it still waits: 401/403, refused, network, disk
            note += f" (last error: {sender.health.last_error})"
        result = SyncResult(name, before, after, note)
        if after.empty and not after.rejected:
            box.remove()
        return result
    finally:
        box.unlock()
        box.close()


def drain(box: Outbox, sender: Sender, stall: float) -> None:
    """Until the outbox is empty, or nothing has moved (no row sent, no block uploaded) for `stall` seconds."""
    while not box.pending().empty:
        if time.monotonic() - sender.activity > stall:
            return
        sender.wake()
        time.sleep(0.1)


def ensure_server_run(box: Outbox, client, uri: str) -> str:
    """The server run an offline run becomes: found by its local id, else created (nested under
    its parent's server run, at its original start time)."""
    info = box.info()
    experiment_id = server.experiment_id_for(client, info.experiment or DEFAULT_EXPERIMENT)
    run_id = server.find_run_by_local_id(client, info.local_id, experiment_id)
    if run_id is None:
        tags = dict(info.tags)
        if info.parent_local_id:
            tags["mlflow.parentRunId"] = parent_server_id(info.parent_local_id, client, uri)
        run_id = server.create_run(client, experiment_id, info.run_name, tags, start_time=info.start_time)
    box.set_server_run(run_id, uri, experiment_id)
    return run_id


def parent_server_id(parent_local_id: str, client, uri: str) -> str:
    parent = Outbox.find(parent_local_id)
    if parent is not None:
        if parent.info().run_id:
            return parent.info().run_id
        if parent.try_lock():
            try:
                return ensure_server_run(parent, client, uri)
            finally:
                parent.unlock()
    found = server.find_run_by_local_id(client, parent_local_id)
    if found is None:
        raise MlexpError(f"the parent run {parent_local_id} of this offline run is neither here nor on {uri}; "
                         "sync the parent first")
    return found


def with_credentials(recorded: str, to: str | None) -> str:
    """The URI to reconnect to a store the outbox names with its password masked (a database
    URI): $MLFLOW_TRACKING_URI or --to when it is that store, with its password."""
    if MASK not in recorded:
        return recorded
    for candidate in (to, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and redact(candidate) == recorded:
            return candidate
    raise MlexpError(f"the outbox keeps no password for {recorded}; set MLFLOW_TRACKING_URI (or --to) to that store's "
                     "URI with its password and sync again")
