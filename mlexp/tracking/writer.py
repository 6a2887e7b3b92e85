"""The group commit: metric points reach the outbox in batches, off the training thread.

A log call only appends its points to an in-memory buffer (microseconds: no SQLite, no
I/O on the training thread). A background thread commits the buffer to the outbox every
`MLEXP_COMMIT_S` (0.1 s) or as soon as `COMMIT_CALLS` log calls wait, whichever comes first,
in one transaction; the sender ships from there.

What a crash can cost, precisely:
- `flush()` commits everything logged so far before it returns. The tracker calls it before
  every write that depends on the points before it: a checkpoint remembered for resume or
  published, a logged model or metric link (they name the last point), the final status.
  So every point logged before a checkpoint is durable before that checkpoint exists for a
  resume, and `--resume` re-logs the steps after it: exactly one point per step.
- A SIGKILL without a resume loses at most the points of the last commit window (0.1 s of
  batch metrics); a clean end, an exception or Ctrl-C loses nothing (`finish` flushes).
- If a commit fails (the outbox's disk is full), its points stay buffered and the next log
  call raises the error, so the run ends saying why, as when the write was synchronous.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from mlexp.tracking.outbox import Outbox
from mlexp.tracking.sender import lower_this_threads_priority, seconds_from_env

COMMIT_CALLS = 1000  # a bigger backlog is committed at once: bounded memory, bounded transactions


def commit_s() -> float:
    return seconds_from_env("MLEXP_COMMIT_S", 0.1)


class PointWriter:
    """One run's metric buffer and the thread that group-commits it to the outbox.

    `skip_steps`: the highest step a resumed run already holds per metric; points at or below
    it are not logged again."""

    def __init__(self, outbox: Outbox, skip_steps: dict[str, int] | None = None):
        self.outbox = outbox
        self.window_s = commit_s()
        self.skip_steps = dict(skip_steps or {})
        # (metrics, step, time) per log call: appending to a deque is atomic, no lock to take
        self._calls: deque[tuple[dict, int, float]] = deque()
        self._commit_lock = threading.Lock()  # commits happen one at a time, in the order logged
        self._error: BaseException | None = None
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._commit_every_window, name="mlexp-writer", daemon=True)
        self._thread.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        """The training thread's whole cost: a copy and an append (a raise if the last commit failed)."""
        if self._error is not None:
            raise self._error
        self._calls.append((dict(metrics), step, time.time()))
        if len(self._calls) >= COMMIT_CALLS:
            self._due.set()

    def flush(self) -> None:
        """Commit every point logged so far; returns once they are durable (raises if they cannot be)."""
        with self._commit_lock:
            calls = []
            while self._calls:
                calls.append(self._calls.popleft())
            points = [(key, float(value), int(logged_at * 1000), step) for metrics, step, logged_at in calls
                      for key, value in metrics.items() if step > self.skip_steps.get(key, -1)]
            try:
                if points:
                    self.outbox.add_metrics(points)
            except BaseException:  # a full disk, or Ctrl-C landing here: the points stay, in order
                self._calls.extendleft(reversed(calls))
                raise
            self._error = None

    def close(self) -> None:
        """Commit what is left and stop the thread (raises if the last points cannot be committed)."""
        self._stop.set()
        self._due.set()
        self._thread.join(5.0)
        self.flush()

    def _commit_every_window(self) -> None:
        lower_this_threads_priority()
        while not self._stop.is_set():
            self._due.wait(self.window_s)
            self._due.clear()
            try:
                self.flush()
            except Exception as error:  # noqa: BLE001 - handed to the training thread's next log call
                self._error = error
                self.outbox.close()  # this thread's connection; a later commit opens a fresh one
                self._stop.wait(1.0)  # a full disk is not retried 10 times a second
        self.outbox.close()  # this thread's connection
