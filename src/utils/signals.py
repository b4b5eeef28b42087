"""Termination signals as exceptions, and sections they cannot cut short.

SIGTERM and SIGHUP are turned into ``Interrupted`` (a BaseException, like the KeyboardInterrupt
that SIGINT raises), so that every ``finally`` runs: weights are restored, the manifest says
``interrupted``, the lock is released. Inside ``deferred()`` (the restore of perturbed weights)
those signals and SIGINT are only recorded; the first one is raised when the section ends, so a
second Ctrl-C cannot abort a restore half-way. Once one SIGTERM or SIGHUP has been raised, the
next ones are ignored until ``as_exceptions`` ends: the stop they ask for is under way.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """The run was asked to stop by a signal (SIGTERM, SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum, frame):
    # The run is stopping now: a repeated SIGTERM or SIGHUP (a supervisor that sends it again,
    # a process group and its parent both told) must not cut that stop short.
    for repeated in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(repeated, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def as_exceptions():
    """SIGTERM and SIGHUP raise ``Interrupted`` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def deferred():
    """Record terminating signals instead of acting on them; act on the first one afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in TERMINATING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            _act_on(received[0], previous[received[0]])


def _act_on(signum: int, handler) -> None:
    """What the handler in place before ``deferred`` would have done with ``signum``."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)
