"""engine/sources/guard.py: a loop that raises is counted, logged once per change
and retried with back-off; a thread that dies anyway is revived and counted; a
source's log lines are bounded whatever it is asked to say."""

from __future__ import annotations

import logging
import threading

import pytest

from engine.sources.guard import Backoff, Guard, LogBudget
from tests.helpers.support import eventually

log = logging.getLogger("event_datagram.test_guard")


class Loop:
    """A source's loop: fails `fail` times (with `errors` in turn), then runs until
    stopped, calling guard.ok() once per round."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0
        self.rounds = 0
        self.guard: Guard | None = None

    def __call__(self, stop: threading.Event) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        while not stop.wait(0.001):
            assert self.guard is not None
            self.guard.ok()
            self.rounds += 1


def make(loop: Loop, counts: dict[str, int], **kw: object) -> Guard:
    def count(reason: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1

    guard = Guard(
        "src test",
        loop,
        logger=log,
        count=count,
        backoff=Backoff(0.001, 2, 0.01),
        **kw,  # type: ignore[arg-type]
    )
    loop.guard = guard
    return guard


def test_what_escapes_the_loop_is_counted_logged_once_per_change_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, log.name)
    same = [RecursionError("deep")] * 5 + [KeyError("x")] * 3
    loop = Loop(list(same))
    counts: dict[str, int] = {}
    downs: list[int] = []
    finals: list[int] = []
    guard = make(loop, counts, down=lambda: downs.append(1), final=lambda: finals.append(1))
    guard.start()
    eventually(lambda: loop.rounds >= 3, 10, "running after the failures")
    assert guard.alive and loop.calls == 9
    assert counts == {"internal": 8} and len(downs) == 8
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "src test: failed: RecursionError: deep (counted; retrying with back-off)",
        "src test: failed: KeyError: 'x' (counted; retrying with back-off)",
        "src test: running again",
    ]
    assert caplog.records[0].exc_info is not None  # the first failure's traceback
    guard.request_stop()
    assert guard.join(5) and finals == [1]
    assert not guard.revive()  # stopped on purpose: not revived


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_thread_that_dies_anyway_is_revived_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, log.name)
    loop = Loop([ValueError("bad")])
    counts: dict[str, int] = {}

    def down() -> None:  # the handler itself fails past what it catches: the thread ends
        if counts.get("internal") == 1 and not counts.get("thread_died"):
            raise SystemExit

    guard = make(loop, counts, down=down)
    guard.start()
    eventually(lambda: not guard.alive, 10, "the thread to die")
    assert guard.revive()
    assert not guard.revive()  # alive again: nothing to do
    eventually(lambda: loop.rounds >= 3, 10, "running again")
    assert counts == {"internal": 1, "thread_died": 1}
    assert any("its thread died: started again" in r.getMessage() for r in caplog.records)
    guard.request_stop()
    assert guard.join(5)


def test_the_log_budget_bounds_lines_and_says_what_it_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, log.name)
    budget = LogBudget(log, per_minute=10)
    sent = [budget.warning("line %d", i) for i in range(1000)]
    assert sent.count(True) == 10 and budget.held_total == 990
    assert [r.getMessage() for r in caplog.records] == [f"line {i}" for i in range(10)]


def test_backoff_grows_to_its_cap_and_starts_over() -> None:
    b = Backoff(1.0, 1.5, 10.0)
    delays = [b.next() for _ in range(8)]
    assert delays[:4] == [1.0, 1.5, 2.25, 3.375] and delays[-1] == 10.0
    b.reset()
    assert b.next() == 1.0
