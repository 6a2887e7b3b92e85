"""The run locks this process holds, kept to itself across fork.

A process forked from the lock's owner (a data loader's worker) gets a copy of each lock's
file descriptor, and flock's lock lasts while any copy is open: a run SIGKILLed with its
workers alive stayed "tracked by a live process" until they noticed and exited (seconds).
Each forked child closes its copies at once; the owner's lock is untouched (flock releases
only on LOCK_UN or when every copy is closed)."""

from __future__ import annotations

import os

fork_safe_locks: set = set()  # open lock files (flock held) of this process


def _close_inherited_locks() -> None:
    for handle in fork_safe_locks:
        handle.close()
    fork_safe_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
