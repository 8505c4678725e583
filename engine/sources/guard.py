"""What keeps a source's thread alive and its log short, shared by every source.

A source hands its loop to a Guard. The loop runs until the stop event is set;
any exception that escapes it is caught, counted (the source's `count(reason)`,
reason "internal"), logged once per change of state (with its traceback the
first time), the source told it is down, and the loop entered again after a
back-off (Backoff: 1 s growing 1.5x to 10 s; the source calls `ok()` after a
good round, which resets it and logs the recovery). A thread that dies anyway
(an error inside this very handler) is started again by `revive()`, which the
`run` command's main loop calls four times a second, counted "thread_died".

LogBudget bounds what one source logs, whatever its peer does: at most
`per_minute` lines in any 60 s; the lines held back are counted and said on the
next line let through. Sources log state changes only, so the budget is a
ceiling for a peer that flaps, not the normal case.

Adopting it (an AMQP source, say): build `Guard(name, loop, logger=log,
count=self._count_error, down=self._set_down, budget=...)`, call its
start()/request_stop()/join() instead of the thread's, `ok()` once connected,
and expose it as `guard` so the runner revives it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

BACKOFF_FIRST: Final = 1.0  # seconds before the first retry
BACKOFF_FACTOR: Final = 1.5
BACKOFF_CAP: Final = 10.0  # seconds between retries at most
LOG_PER_MINUTE: Final = 10  # lines one source may log in any 60 s


class Backoff:
    """Delays between retries: first, first*factor, ... up to cap; reset() starts over."""

    def __init__(
        self, first: float = BACKOFF_FIRST, factor: float = BACKOFF_FACTOR, cap: float = BACKOFF_CAP
    ) -> None:
        self.first = first
        self.factor = factor
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.first


class LogBudget:
    """A logger's lines for one source, at most `per_minute` in any 60 s."""

    def __init__(self, logger: logging.Logger, per_minute: int = LOG_PER_MINUTE) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self._times: collections.deque[float] = collections.deque(maxlen=per_minute)
        self._held = 0  # lines held back since the last one let through
        self.held_total = 0
        self._lock = threading.Lock()  # a source's thread and stop() may both log

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log unless the budget is spent; True when the line went out."""
        now = time.monotonic()
        with self._lock:
            times = self._times
            if len(times) == self.per_minute and now - times[0] < 60.0:
                self._held += 1
                self.held_total += 1
                return False
            times.append(now)
            held, self._held = self._held, 0
        if held:
            msg += f" ({held} line(s) before this one held back: at most {self.per_minute}/min)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def info(self, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)


class Guard:
    """Runs `loop(stop)` in a thread that survives what escapes it (see the module)."""

    def __init__(
        self,
        name: str,
        loop: Callable[[threading.Event], None],
        *,
        logger: logging.Logger,
        count: Callable[[str], None],
        down: Callable[[], None] | None = None,
        final: Callable[[], None] | None = None,
        budget: LogBudget | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.stop_event = threading.Event()
        self.budget = budget or LogBudget(logger)
        self.backoff = backoff or Backoff()
        self._loop = loop
        self._count = count
        self._down = down
        self._final = final
        self._failing: str | None = None  # what the last failure was, until ok()
        self._started = False
        self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._main, name=f"edg-{self.name}", daemon=True)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def request_stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def revive(self) -> bool:
        """Start the thread again if it died while it should run; True if it was."""
        if not self._started or self.stop_event.is_set() or self._thread.is_alive():
            return False
        self._safe(self._count, "thread_died")
        self.budget.log(logging.ERROR, "%s: its thread died: started again", self.name)
        self._thread = self._new_thread()
        self._thread.start()
        return True

    # -- the thread --------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    self._loop(self.stop_event)
                except Exception as exc:
                    self._failed(exc)
                    self.stop_event.wait(self.backoff.next())
        finally:
            if self.stop_event.is_set() and self._final is not None:
                self._safe(self._final)

    def _failed(self, exc: Exception) -> None:
        self._safe(self._count, "internal")
        if self._down is not None:
            self._safe(self._down)
        what = f"{type(exc).__name__}: {exc}"[:300]
        if what != self._failing:
            self.budget.log(
                logging.ERROR,
                "%s: failed: %s (counted; retrying with back-off)",
                self.name,
                what,
                exc_info=exc if self._failing is None else None,
            )
        self._failing = what

    def ok(self) -> None:
        """A round went well: the back-off starts over; a recovery is logged once."""
        self.backoff.reset()
        if self._failing is not None:
            self._failing = None
            self.budget.info("%s: running again", self.name)

    @staticmethod
    def _safe(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a broken callback must not take the guard with it
            logging.getLogger("event_datagram").exception("guard callback failed")
