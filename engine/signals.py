"""Catching the signals that stop a process: one helper for every entry point.

A signal handler runs in the main thread between two bytecodes, possibly while
that thread holds a lock (a `threading.Event.wait()` holds its condition's):
a handler that calls `Event.set()` then deadlocks the process. So the handler
here only records the signal, and the waiting side polls that record.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

POLL_S = 0.05  # how soon a waiting loop sees a signal


class SignalCatcher:
    """`with SignalCatcher((SIGTERM, SIGINT)) as caught: ... caught.wait(0.2)`.

    Installs handlers that only record the signal (`received`, the first one),
    and restores the previous handlers on exit. Main thread only.

    `reload` signals (SIGHUP for `run`) do not stop anything: each one sets a
    flag that `take_reload()` reads and clears, and ends a `wait()` early.
    """

    def __init__(
        self, signals: Iterable[signal.Signals], reload: Iterable[signal.Signals] = ()
    ) -> None:
        self.signals = tuple(signals)
        self.reload_signals = tuple(reload)
        self.received: signal.Signals | None = None
        self._reload = False
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def _record_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True

    def take_reload(self) -> bool:
        """True once per burst of reload signals since the last call."""
        wanted, self._reload = self._reload, False
        return wanted

    def __enter__(self) -> SignalCatcher:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        for sig in self.reload_signals:
            self._previous[sig] = signal.signal(sig, self._record_reload)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` s, returning early (True) once a signal came
        (a stop signal, or a reload not yet taken)."""
        deadline = time.monotonic() + timeout
        while self.received is None and not self._reload:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S, left))
        return True
