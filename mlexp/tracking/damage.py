"""Damaged outboxes: found by `mlexp sync`, reported with what can still be read, moved aside,
and what is whole in them still sent.

An outbox's database can be damaged (a disk error, a file truncated or overwritten). Such an
outbox is never skipped in silence, nor allowed to stop the others: `sync` checks each one
(SQLite's quick_check), and a damaged one is renamed `RUN.damaged-TIME` (so it is not tried
again), named in one line with how many records and files can still be read, and its
checkpoints whose files match their manifest's sha256 are uploaded to the run: a whole
checkpoint is a checkpoint, whatever happened to the database beside it.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from mlexp.tracking import server
from mlexp.tracking.outbox import QUARANTINE, outbox_root


def damaged_outboxes(only: str | None = None) -> Iterator[tuple[Path, str]]:
    """(folder, what is wrong) of each damaged outbox on this machine (`only`: that run's)."""
    root = outbox_root()
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        database = folder / "outbox.db"
        if QUARANTINE in folder.name or (only and folder.name != only) or not database.is_file():
            continue
        if database.stat().st_size == 0:  # made by a process killed before it recorded anything
            continue
        problem = integrity_problem(database)
        if problem:
            yield folder, problem


def integrity_problem(database: Path) -> str | None:
    try:
        with closing(sqlite3.connect(database, timeout=10)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                return f"quick_check: {verdict}"
            db.execute("SELECT local_id, run_id FROM run").fetchall()
            db.execute("SELECT count(*) FROM records").fetchone()
    except sqlite3.DatabaseError as error:
        return str(error)
    return None


def readable_records(database: Path) -> int | None:
    try:
        with closing(sqlite3.connect(database, timeout=10)) as db:
            return int(db.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.DatabaseError:
        return None


def whole_checkpoints(folder: Path) -> list[tuple[Path, dict]]:
    """The checkpoint folders whose files all match their own manifest, oldest epoch first."""
    found = []
    for manifest_path in (folder / "files").rglob(server.MANIFEST):
        try:
            manifest = json.loads(manifest_path.read_text())
            if all(server.file_sha256(manifest_path.parent / name) == entry["sha256"] for name, entry in manifest["files"].items()):
                found.append((manifest_path.parent, manifest))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda item: item[1]["epoch"])


def rescue(folder: Path, problem: str, tracking_uri: str, dry_run: bool = False) -> str:
    """Report, quarantine and send what is whole of one damaged outbox; the line that says so."""
    records = readable_records(folder / "outbox.db")
    files = sum(1 for path in (folder / "files").rglob("*") if path.is_file()) if (folder / "files").is_dir() else 0
    checkpoints = whole_checkpoints(folder)
    counts = (f"{'an unknown number of' if records is None else records} record(s), {files} file(s), "
              f"{len(checkpoints)} whole checkpoint(s)")
    if dry_run:
        return f"{folder.name}: outbox damaged ({problem}); recoverable: {counts}; would move it aside"
    moved = folder.with_name(f"{folder.name}{QUARANTINE}{time.strftime('%Y%m%dT%H%M%S')}")
    folder.rename(moved)
    sent = send_checkpoints(moved.name.split(QUARANTINE)[0], [(moved / path.relative_to(folder), manifest)
                                                              for path, manifest in checkpoints], tracking_uri)
    return f"{folder.name}: outbox damaged ({problem}); moved to {moved}; recoverable: {counts}; {sent}"


def send_checkpoints(run_id: str, checkpoints: list[tuple[Path, dict]], tracking_uri: str) -> str:
    """Upload whole checkpoints where a live run of them finds them (checkpoints/last/, the newest
    one's manifest published last, as a resume reads it)."""
    if not checkpoints:
        return "no checkpoint to send"
    try:
        client = server.client_for(tracking_uri)
        client.get_run(run_id)
        for path, manifest in checkpoints:
            server.upload_folder(client, run_id, path, f"checkpoints/last/{manifest['folder']}")
        with tempfile.TemporaryDirectory() as staging:
            newest = Path(staging) / server.MANIFEST
            newest.write_text(json.dumps(checkpoints[-1][1], indent=2))
            client.log_artifact(run_id, str(newest), "checkpoints/last")
    except Exception as error:  # noqa: BLE001 - the server is away or the run unknown: said, kept
        return f"checkpoints not sent ({server.first_line(error)}): they stay in the moved folder"
    return f"sent {len(checkpoints)} whole checkpoint(s) to run {run_id} (newest: epoch {checkpoints[-1][1]['epoch']})"
