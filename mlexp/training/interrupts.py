"""Ctrl-C and SIGTERM end a run KILLED, and are never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal
arrives. If that is inside a finalizer (a `__del__`, a weakref callback the garbage collector
runs between two lines of ours), Python prints "Exception ignored" and carries on: the run
would train to its end and exit 0 as if nobody had asked it to stop. So the handler also
records the stop, and a run asks for it whenever it hands its steps to the tracker (every
few optimizer steps) and when its training ends, a study before each run it starts
(`raise_if_stopped`): a stop swallowed once is raised again a few steps later. The record
lasts until the outermost of these contexts ends (a study's, around its runs' own): a
later run in the same process (a notebook, a script) starts afresh.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_stopped_by: int | None = None  # the signal that asked this process to stop
_depth = 0  # stops_as_interrupt contexts open now (a study's, and its run's inside it)


def _stop(signum, frame) -> None:
    global _stopped_by
    _stopped_by = signum
    raise KeyboardInterrupt


def raise_if_stopped() -> None:
    """KeyboardInterrupt if a stop arrived (and was swallowed somewhere) since the run began."""
    if _stopped_by is not None:
        raise KeyboardInterrupt


@contextmanager
def stops_as_interrupt() -> Iterator[None]:
    """SIGTERM (what torchrun and schedulers send) ends the run KILLED, like Ctrl-C; both are
    recorded. A SIGINT the process was started to ignore (a background job of a script) stays
    ignored."""
    global _depth, _stopped_by
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler
                                else [])
    previous = {name: signal.signal(name, _stop) for name in names}
    _depth += 1
    try:
        raise_if_stopped()
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _stopped_by = None
        for name, handler in previous.items():
            signal.signal(name, handler)
