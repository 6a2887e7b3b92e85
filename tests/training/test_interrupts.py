"""A Ctrl-C or SIGTERM that Python swallows (it arrived inside a finalizer) still stops the run."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from mlexp.training import interrupts
from mlexp.training.interrupts import raise_if_stopped, stops_as_interrupt


class SignalledWhileFinalized:
    """Sends `signum` to this process from its `__del__`: the handler's KeyboardInterrupt is
    raised inside the finalizer, where Python prints "Exception ignored" and goes on."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        time.sleep(0.05)  # the handler runs here, between two bytecodes of this finalizer


@pytest.fixture
def as_from_a_shell():
    """SIGINT as a command started from a shell has it (earlier code in this test process may
    have left it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_swallowed_by_a_finalizer_is_raised_at_the_next_check(signum, monkeypatch, as_from_a_shell):
    monkeypatch.setattr(interrupts, "_stopped_by", None)
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)  # where Python puts "Exception ignored in ..."
    with stops_as_interrupt():  # a study
        with stops_as_interrupt():  # its trial's run
            raise_if_stopped()  # nothing asked yet
            SignalledWhileFinalized(signum)  # dropped at once: its finalizer swallows the interrupt
            assert [type(what.exc_value) for what in swallowed] == [KeyboardInterrupt]
            with pytest.raises(KeyboardInterrupt):
                raise_if_stopped()  # at the run's next hand-over of steps
        with pytest.raises(KeyboardInterrupt), stops_as_interrupt():  # the study's next run does not start
            pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handlers are back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with stops_as_interrupt():  # once the outermost has ended, a later run of this process starts afresh
        raise_if_stopped()


def test_a_sigint_the_process_was_told_to_ignore_stays_ignored(monkeypatch):
    monkeypatch.setattr(interrupts, "_stopped_by", None)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a script
    try:
        with stops_as_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise_if_stopped()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
