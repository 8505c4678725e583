"""engine/sources/upstream.py against a fake MI, with its intervals shortened: each
state change (subscribed, gone, down, back, refused) and what it counts and logs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.errors import MIClientError, MIReplyError, SubscriptionError
from engine.sources import upstream as up_mod
from engine.sources.upstream import Upstream
from tests.helpers.support import eventually

ZERO = dict.fromkeys(up_mod.ERROR_REASONS, 0)
SOCK = "udp:127.0.0.1:9050"
MI = "udp:127.0.0.1:8080"


class FakeEngine:
    def __init__(self, limit: int = 100) -> None:
        self.events: list[str] = []
        self.limit = limit

    def register_event(self, name: str) -> int:
        if name not in self.events:
            if len(self.events) >= self.limit:
                raise SubscriptionError("no event slot left")
            self.events.append(name)
        return self.events.index(name)


class FakeMI:
    """OpenSIPS's answers to the three commands an upstream uses."""

    def __init__(self, events: list[str]) -> None:
        self.events = list(events)
        self.subs: dict[tuple[str, str], int] = {}
        self.down = False
        self.garbage = False
        self.refuse: set[str] = set()
        self.calls: list[tuple[str, list[Any]]] = []
        self.lock = threading.Lock()
        self.registered_before: list[bool] = []  # at each event_subscribe: known locally?
        self.engine: FakeEngine | None = None

    def __call__(
        self, target: str, method: str, params: list[Any], *, timeout: float, max_reply: int
    ) -> Any:
        assert target == MI and timeout <= up_mod.CALL_TIMEOUT and max_reply == up_mod.MAX_REPLY
        with self.lock:
            self.calls.append((method, params))
            if self.down:
                raise MIClientError(f"cannot reach the MI at {target}: Connection refused")
            if self.garbage:
                raise MIClientError(f"{target} answered with non-JSON: b'<html>'", "bad_reply")
            if method == "events_list":
                return {"Events": [{"name": n, "id": i} for i, n in enumerate(self.events)]}
            event, sock = params[0], params[1]
            if method == "event_subscribe":
                if event not in self.events or event in self.refuse:
                    raise MIReplyError(400, "Bad parameter value")
                if self.engine is not None:
                    self.registered_before.append(event in self.engine.events)
                if params[2] == 0:
                    self.subs.pop((event, sock), None)
                else:
                    self.subs[(event, sock)] = params[2]
                return "OK"
            assert method == "subscribers_list"
            if event not in self.events:
                raise MIReplyError(404, "Event not published")
            if (event, sock) not in self.subs:
                raise MIReplyError(404, "Subscriber does not exist")
            expire = self.subs[(event, sock)]
            return {"Event": {"name": event, "Subscriber": {"socket": sock, "expire": expire}}}

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for m, _ in self.calls if m == method)

    def restart(self) -> None:
        with self.lock:
            self.subs.clear()


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(up_mod, "CHECK_INTERVAL", 0.05)
    monkeypatch.setattr(up_mod, "RETRY_INTERVAL", 0.05)


@pytest.fixture
def started() -> Iterator[list[Upstream]]:
    ups: list[Upstream] = []
    yield ups
    up_mod.stop_all(ups)


def make(
    started: list[Upstream], mi: FakeMI, events: list[str], engine: FakeEngine | None = None
) -> tuple[Upstream, FakeEngine]:
    engine = engine or FakeEngine()
    mi.engine = engine
    upstream = Upstream(engine, MI, events, SOCK, 120, call=mi)  # type: ignore[arg-type]
    started.append(upstream)
    upstream.start()
    return upstream, engine


def state(upstream: Upstream) -> tuple[int | None, int, dict[str, int]]:
    (s,) = upstream.statistics()
    assert (s.kind, s.name, s.received, s.raised, s.rejected) == ("upstream", MI, 0, 0, {})
    return s.up, s.events, s.errors


def messages(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


def test_named_events_are_registered_then_subscribed_and_unsubscribed_on_stop(
    started: list[Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "event_datagram.upstream")
    mi = FakeMI(["E_A", "E_B", "E_C"])
    upstream, engine = make(started, mi, ["E_A", "E_B"])
    assert engine.events == ["E_A", "E_B"]  # at start(), before any MI call
    eventually(lambda: state(upstream)[:2] == (1, 2), 5, "up")
    assert mi.subs == {("E_A", SOCK): 120, ("E_B", SOCK): 120}
    assert all(mi.registered_before)
    eventually(lambda: mi.count("subscribers_list") >= 6, 5, "checks")
    assert state(upstream)[2] == ZERO
    up_mod.stop_all([upstream])
    assert mi.subs == {} and state(upstream)[:2] == (0, 0)
    assert messages(caplog, "subscribed") == [
        f"upstream {MI}: subscribed {SOCK} to 2 event(s) (expire 120 s)",
        f"upstream {MI}: unsubscribed {SOCK} from 2 event(s)",
    ]


def test_a_forgotten_subscription_is_made_again_at_the_next_check(
    started: list[Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "event_datagram.upstream")
    mi = FakeMI(["E_A"])
    upstream, _ = make(started, mi, ["E_A"])
    eventually(lambda: state(upstream)[0] == 1, 5, "up")
    for _ in range(3):
        mi.restart()
        eventually(lambda: ("E_A", SOCK) in mi.subs, 5, "subscribed again")
    eventually(lambda: len(messages(caplog, "resubscribed")) == 3, 5, "three lines")
    assert len(messages(caplog, "no longer subscribed")) == 3
    assert state(upstream) == (1, 1, ZERO)


def test_down_is_logged_once_and_counted_per_call(
    started: list[Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "event_datagram.upstream")
    mi = FakeMI(["E_A"])
    mi.down = True
    upstream, engine = make(started, mi, ["E_A"])
    eventually(lambda: state(upstream)[2]["unreachable"] >= 5, 5, "retries")
    assert state(upstream)[:2] == (0, 0) and engine.events == ["E_A"]
    assert len(messages(caplog, ": down:")) == 1
    mi.down = False
    eventually(lambda: state(upstream)[:2] == (1, 1), 5, "up")
    mi.down = True
    eventually(lambda: state(upstream)[0] == 0, 5, "down again")
    mi.restart()
    mi.down = False
    eventually(lambda: state(upstream)[0] == 1, 5, "back")
    assert len(messages(caplog, ": down:")) == 2
    assert len(messages(caplog, " subscribed ")) == 1
    assert len(messages(caplog, "resubscribed")) == 1


def test_every_event_of_the_upstream_and_events_it_refuses(
    started: list[Upstream], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "event_datagram.upstream")
    mi = FakeMI(["E_A", "E_B", "E_C"])
    mi.refuse = {"E_B"}
    upstream, engine = make(started, mi, ["*"], FakeEngine(limit=2))
    eventually(lambda: state(upstream)[1] == 1, 5, "E_A subscribed")
    # E_C cannot be registered here (no slot): not taken. E_B refused there: retried.
    assert engine.events == ["E_A", "E_B"]
    eventually(lambda: state(upstream)[2]["mi_error"] >= 3, 5, "E_B retried")
    assert state(upstream)[:2] == (0, 1)  # not every event: not up
    assert len(messages(caplog, "cannot subscribe")) == 1
    assert messages(caplog, "refused") == [
        f"upstream {MI}: refused 1 of 3 event(s): no event slot left here (engine.max_events)"
        " (e.g. E_C); not taken (up stays 0)"
    ]
    assert messages(caplog, " subscribed ") == [
        f"upstream {MI}: subscribed {SOCK} to 1 of 3 event(s) (expire 120 s)"
    ]
    assert upstream.statistics()[0].refused == 2  # E_C here, E_B there
    mi.refuse = set()
    eventually(lambda: state(upstream)[1] == 2, 5, "E_B too")
    # E_C is still refused here: not every event asked for is taken, so not up.
    assert state(upstream)[0] == 0 and upstream.statistics()[0].refused == 1
    assert mi.count("events_list") >= 2  # read again at each (re)subscription
    assert len(messages(caplog, "refused")) == 1  # one line per change, none per retry


def test_a_reply_that_is_not_json_rpc_is_a_bad_reply(started: list[Upstream]) -> None:
    mi = FakeMI(["E_A"])
    mi.garbage = True
    upstream, _ = make(started, mi, ["E_A"])
    eventually(lambda: state(upstream)[2]["bad_reply"] >= 2, 5, "bad replies")
    assert state(upstream)[:2] == (0, 0) and state(upstream)[2]["unreachable"] == 0


def test_stop_with_a_dead_upstream_is_quick(started: list[Upstream]) -> None:
    mi = FakeMI(["E_A", "E_B", "E_C"])
    upstream, _ = make(started, mi, ["*"])
    eventually(lambda: state(upstream)[:2] == (1, 3), 5, "up")
    mi.down = True
    before = mi.count("event_subscribe")
    start = time.monotonic()
    up_mod.stop_all([upstream])
    assert time.monotonic() - start < 0.5
    assert mi.count("event_subscribe") - before == 1  # one try, not one per event


def test_named_events_with_no_slot_here_are_not_up_and_tried_again_at_refresh(
    started: list[Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "event_datagram.upstream")
    mi = FakeMI(["E_A", "E_B"])
    engine = FakeEngine(limit=1)
    mi.engine = engine
    upstream = Upstream(engine, MI, ["E_A", "E_B"], SOCK, 1, call=mi)  # type: ignore[arg-type]
    started.append(upstream)
    upstream.start()  # refreshed every 1/3 s
    eventually(lambda: state(upstream)[1] == 1, 5, "E_A subscribed")
    assert state(upstream)[0] == 0 and upstream.statistics()[0].refused == 1
    eventually(lambda: upstream.rounds >= 3, 5, "refreshes")
    assert len(messages(caplog, "refused")) == 1  # the same refusal: one line
    engine.limit = 2
    eventually(lambda: state(upstream)[:2] == (1, 2), 5, "E_B taken at a refresh")
    assert upstream.statistics()[0].refused == 0
    assert messages(caplog, "can be registered here again")
