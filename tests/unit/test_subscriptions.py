"""Tests for engine/subscriptions.py (and the state file in engine/state.py).

Real files under tmp_path, real parsing and resolution of destinations (nothing
is ever sent); the only stand-in is a settable clock passed as ``clock``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.address import AddressError, parse_destination
from engine.state import load_state, read_state
from engine.subscriptions import (
    DEFAULT_EXPIRE,
    AllowList,
    BadExpire,
    Change,
    NotAllowed,
    Registry,
    StateFileError,
    Subscriber,
    SubscriptionError,
    UnknownEvent,
)
from tests.helpers.support import Clock

T0 = 1_767_225_600.0


def make(
    tmp_path: Path | None = None, clock: Clock | None = None, **kw: object
) -> tuple[Registry, Clock, list[Change]]:
    clock = clock or Clock()
    changes: list[Change] = []
    if tmp_path is not None:
        kw.setdefault("state_file", tmp_path / "state.json")
    reg = Registry(clock=clock, on_change=changes.append, **kw)  # type: ignore[arg-type]
    reg.register_event("E_A")
    reg.register_event("E_B")
    return reg, clock, changes


def keys(reg: Registry, event: str = "E_A") -> list[str]:
    return [s.dest.key for s in reg.subscribers(event)]


def summary(changes: list[Change]) -> list[tuple[str, str, str]]:
    return [(c.kind, c.event, c.subscriber.dest.key) for c in changes]


# -- events ---------------------------------------------------------------------


def test_events_get_dense_ids_in_registration_order_and_registering_is_idempotent() -> None:
    reg = Registry()
    assert [reg.register_event(n) for n in ("E_X", "E_Y", "E_X", "E_Z")] == [0, 1, 0, 2]
    assert reg.events() == [("E_X", 0), ("E_Y", 1), ("E_Z", 2)]
    assert reg.event_id("E_Y") == 1
    assert reg.event_name(2) == "E_Z"


@pytest.mark.parametrize("name", ["", "E X", "E\tX", "E\x00", "É", "x" * 256, "E\x7f"])
def test_bad_event_names_are_refused(name: str) -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="event name"):
        reg.register_event(name)
    assert reg.events() == []


def test_event_name_limits() -> None:
    reg = Registry(max_events=2)
    reg.register_event("!" * 255)
    reg.register_event("E_PIKE_BLOCKED")
    with pytest.raises(SubscriptionError, match="E_THIRD"):
        reg.register_event("E_THIRD")
    assert reg.register_event("E_PIKE_BLOCKED") == 1  # known names still answer
    assert len(reg.events()) == 2


def test_unknown_event_everywhere() -> None:
    reg, _, changes = make()
    calls = [
        lambda: reg.subscribe("E_NOPE", "udp:127.0.0.1:9000"),
        lambda: reg.subscribe("E_NOPE", "udp:127.0.0.1:9000", 0),
        lambda: reg.unsubscribe("E_NOPE", "udp:127.0.0.1:9000"),
        lambda: reg.subscribers("E_NOPE"),
        lambda: reg.find("E_NOPE", "udp:127.0.0.1:9000"),
        lambda: reg.event_id("E_NOPE"),
    ]
    for call in calls:
        with pytest.raises(UnknownEvent, match="E_NOPE") as info:
            call()
        assert info.value.event == "E_NOPE"
    with pytest.raises(UnknownEvent):
        reg.event_name(7)
    assert changes == []


# -- subscribe, expire, refresh, order ------------------------------------------------


def test_default_expire_is_3600() -> None:
    reg, _, _ = make()
    change = reg.subscribe("E_A", "udp:127.0.0.1:9002")
    assert DEFAULT_EXPIRE == 3600
    assert change is not None and change.kind == "added"
    (sub,) = reg.subscribers("E_A")
    assert sub.expire == 3600 and sub.subscribed_at == T0 and sub.ttl(T0) == 3600


def test_expire_zero_unsubscribes_at_once() -> None:
    reg, _, changes = make()
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 60)
    change = reg.subscribe("E_A", "udp:127.0.0.1:9000", 0)  # same clock second
    assert change is not None and change.kind == "removed"
    assert change.subscriber.dest.key == "udp:127.0.0.1:9000"
    assert keys(reg) == ["udp:127.0.0.1:9001"]
    assert reg.find("E_A", "udp:127.0.0.1:9000") is None
    # not subscribed: nothing happens, nothing is reported
    before = list(changes)
    assert reg.subscribe("E_A", "udp:127.0.0.1:9000", 0) is None
    assert reg.subscribe("E_A", "unix:/tmp/never", 0) is None
    assert changes == before


def test_expire_zero_still_validates_the_socket() -> None:
    reg, _, _ = make()
    with pytest.raises(AddressError):
        reg.subscribe("E_A", "udp:127.0.0.1", 0)


@pytest.mark.parametrize("expire", [-1, -5, "30", 1.5, 2.0, True, 2**31, [1]])
def test_bad_expire(expire: object) -> None:
    reg, _, changes = make()
    with pytest.raises(BadExpire) as info:
        reg.subscribe("E_A", "udp:127.0.0.1:9000", expire)  # type: ignore[arg-type]
    assert repr(expire) in str(info.value) and info.value.expire == expire
    assert reg.subscribers("E_A") == [] and changes == []


def test_bad_expire_is_reported_before_unknown_event() -> None:
    reg, _, _ = make()
    with pytest.raises(BadExpire):
        reg.subscribe("E_NOPE", "udp:127.0.0.1:9000", -5)


def test_newest_first_like_opensips(clock: Clock) -> None:
    reg, _, _ = make(clock=clock)
    for port, expire in [(9000, 60), (9001, 60), (9002, 3600)]:
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", expire)
        clock.advance(1)
    reg.subscribe("E_A", "unix:/tmp/ev_mi_test.sock")
    reg.subscribe("E_A", "udp:127.0.0.1:9003", 30)
    reg.subscribe("E_A", "udp:127.0.0.1:9004", 1)
    assert keys(reg) == [
        "udp:127.0.0.1:9004",
        "udp:127.0.0.1:9003",
        "unix:/tmp/ev_mi_test.sock",
        "udp:127.0.0.1:9002",
        "udp:127.0.0.1:9001",
        "udp:127.0.0.1:9000",
    ]


def test_refresh_keeps_position_and_makes_no_duplicate(clock: Clock) -> None:
    reg, _, changes = make(clock=clock)
    for port in (9000, 9001, 9002):
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", 60)
    clock.advance(10)
    change = reg.subscribe("E_A", "udp:127.0.0.1:9001", 120)
    assert change is not None and change.kind == "refreshed"
    assert keys(reg) == ["udp:127.0.0.1:9002", "udp:127.0.0.1:9001", "udp:127.0.0.1:9000"]
    sub = reg.find("E_A", "udp:127.0.0.1:9001")
    assert sub is not None and (sub.expire, sub.subscribed_at) == (120, T0 + 10)
    assert reg.subscribe("E_A", "udp:127.0.0.1:9001") is not None  # no expire: back to 3600
    sub = reg.find("E_A", "udp:127.0.0.1:9001")
    assert sub is not None and sub.expire == 3600
    assert [c.kind for c in changes] == ["added"] * 3 + ["refreshed"] * 2


def test_static_subscription_becomes_expiring_on_resubscribe() -> None:
    reg, _, _ = make()
    reg.subscribe("E_A", "udp:127.0.0.1:9999", None)
    (sub,) = reg.subscribers("E_A")
    assert sub.expire is None and sub.ttl(T0 + 10**9) is None and not sub.expired(T0 + 10**9)
    reg.subscribe("E_A", "udp:127.0.0.1:9999", 30)
    (sub,) = reg.subscribers("E_A")
    assert sub.expire == 30


def test_events_have_separate_lists() -> None:
    reg, _, _ = make()
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    reg.subscribe("E_B", "udp:127.0.0.1:9001")
    assert keys(reg, "E_A") == ["udp:127.0.0.1:9000"]
    assert keys(reg, "E_B") == ["udp:127.0.0.1:9001"]
    assert reg.unsubscribe("E_B", "udp:127.0.0.1:9000") is None


# -- ttl and expiry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "ttl"),
    [(0, 60), (0.5, 60), (0.999, 60), (1, 59), (1.5, 59), (59, 1), (59.9, 1), (60, 0), (75, -15)],
)
def test_ttl_in_whole_seconds_like_opensips(elapsed: float, ttl: int) -> None:
    sub = Subscriber(parse_destination("udp:127.0.0.1:9000"), 60, T0)
    assert sub.ttl(T0 + elapsed) == ttl
    assert sub.expired(T0 + elapsed) == (ttl <= 0)


def test_ttl_never_exceeds_expire_when_the_clock_steps_back() -> None:
    sub = Subscriber(parse_destination("udp:127.0.0.1:9000"), 60, T0)
    assert sub.ttl(T0 - 5) == 60 and not sub.expired(T0 - 5)


def test_expired_subscribers_are_removed_on_listing(clock: Clock) -> None:
    reg, _, changes = make(clock=clock)
    reg.subscribe("E_A", "udp:127.0.0.1:9004", 1)
    reg.subscribe("E_A", "udp:127.0.0.1:9003", 30)
    reg.subscribe("E_B", "udp:127.0.0.1:9005", 1)
    reg.subscribe("E_B", "udp:127.0.0.1:9006", 2)
    del changes[:]
    clock.advance(0.999)
    assert [s.ttl(clock()) for s in reg.subscribers("E_A")] == [30, 1]
    clock.advance(0.001)
    # Listing sweeps (every event: the expiry heap is one for all, never a scan).
    assert keys(reg) == ["udp:127.0.0.1:9003"]
    assert summary(changes) == [
        ("removed", "E_A", "udp:127.0.0.1:9004"),
        ("removed", "E_B", "udp:127.0.0.1:9005"),
    ]
    clock.advance(1)
    assert reg.find("E_B", "udp:127.0.0.1:9006") is None  # find sweeps too
    assert summary(changes)[-1] == ("removed", "E_B", "udp:127.0.0.1:9006")


def test_sweep_removes_every_expired_subscriber(clock: Clock) -> None:
    reg, _, changes = make(clock=clock)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 5)
    reg.subscribe("E_B", "udp:127.0.0.1:9001", 2)
    reg.subscribe("E_B", "udp:127.0.0.1:9002", 100)
    reg.subscribe("E_A", "unix:/tmp/static", None)
    del changes[:]
    assert reg.next_expiry() == T0 + 2
    clock.advance(1.9)
    assert reg.sweep() == []
    clock.advance(3.1)
    removed = reg.sweep()
    assert summary(removed) == [
        ("removed", "E_B", "udp:127.0.0.1:9001"),
        ("removed", "E_A", "udp:127.0.0.1:9000"),
    ]
    assert changes == removed
    assert reg.next_expiry() == T0 + 100
    assert keys(reg, "E_A") == ["unix:/tmp/static"]
    assert keys(reg, "E_B") == ["udp:127.0.0.1:9002"]


def test_next_expiry_follows_refresh_and_unsubscribe(clock: Clock) -> None:
    reg, _, _ = make(clock=clock)
    assert reg.next_expiry() is None
    reg.subscribe("E_A", "udp:127.0.0.1:9000", None)
    assert reg.next_expiry() is None
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 10)
    reg.subscribe("E_A", "udp:127.0.0.1:9002", 20)
    assert reg.next_expiry() == T0 + 10
    clock.advance(5)
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 60)  # refreshed: now expires at +65
    assert reg.next_expiry() == T0 + 20
    reg.unsubscribe("E_A", "udp:127.0.0.1:9002")
    assert reg.next_expiry() == T0 + 65
    clock.advance(20)  # nothing expired: a refresh must not leave a stale expiry behind
    assert reg.sweep() == [] and len(reg.subscribers("E_A")) == 2


def test_next_expiry_stays_right_with_many_refreshes(clock: Clock) -> None:
    reg, _, _ = make(clock=clock)
    for i in range(500):
        clock.advance(0.01)
        reg.subscribe("E_A", f"udp:127.0.0.1:{9000 + i % 7}", 100 - i % 13)
    live = reg.subscribers("E_A")
    assert len(live) == 7
    expected = min(s.subscribed_at + s.expire for s in live if s.expire is not None)
    assert reg.next_expiry() == expected


def test_resubscribing_an_expired_subscriber_makes_a_new_one(clock: Clock) -> None:
    reg, _, changes = make(clock=clock)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 1)
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 60)
    clock.advance(1)
    del changes[:]
    change = reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    assert change is not None and change.kind == "added"
    assert summary(changes) == [
        ("removed", "E_A", "udp:127.0.0.1:9000"),
        ("added", "E_A", "udp:127.0.0.1:9000"),
    ]
    assert keys(reg) == ["udp:127.0.0.1:9000", "udp:127.0.0.1:9001"]


# -- matching -------------------------------------------------------------------------


def test_matching_is_exact_never_by_prefix() -> None:
    reg, _, _ = make()
    reg.subscribe("E_A", "udp:127.0.0.10:9000")
    reg.subscribe("E_A", "unix:/tmp/ab")
    assert reg.find("E_A", "udp:127.0.0.1:9000") is None
    assert reg.find("E_A", "unix:/tmp/a") is None
    assert reg.unsubscribe("E_A", "udp:127.0.0.1:9000") is None
    assert reg.unsubscribe("E_A", "/tmp/a") is None
    change = reg.subscribe("E_A", "unix:/tmp/a", 30)
    assert change is not None and change.kind == "added"  # not a refresh of /tmp/ab
    ab = reg.find("E_A", "unix:/tmp/ab")
    assert ab is not None and ab.expire == 3600
    assert len(reg.subscribers("E_A")) == 3


def test_unix_prefix_is_optional_and_names_are_kept_apart_from_addresses() -> None:
    reg, _, _ = make()
    reg.subscribe("E_A", "/tmp/x.sock")
    change = reg.subscribe("E_A", "unix:/tmp/x.sock", 30)
    assert change is not None and change.kind == "refreshed"
    reg.subscribe("E_A", "udp:localhost:9000")
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    assert keys(reg) == ["udp:127.0.0.1:9000", "udp:localhost:9000", "unix:/tmp/x.sock"]
    assert reg.find("E_A", "/tmp/x.sock") is not None


@pytest.mark.parametrize("socket", ["foo:bar", "udp:127.0.0.1", "", "udp:127.0.0.1:0", 42])
def test_find_never_raises_for_an_unparsable_socket(socket: str) -> None:
    reg, _, _ = make()
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    assert reg.find("E_A", socket) is None


def test_unsubscribe_and_find_do_not_need_name_resolution() -> None:
    # the key is the printed form: a name that no longer resolves can still be found
    reg, _, _ = make()
    reg.subscribe("E_A", "udp:localhost:9000")
    assert reg.find("E_A", "udp:localhost:9000") is not None
    assert reg.unsubscribe("E_A", "udp:localhost:9000") is not None


# -- allow-list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "socket",
    [
        "udp:127.0.0.1:9000",
        "udp:127.255.0.9:9",
        "udp:[::1]:9000",
        "udp:[::ffff:127.0.0.1]:9",
        "udp:localhost:9000",
        "/tmp/x.sock",
        "unix:/tmp/deeper/x.sock",
        "unix:/tmp/./y.sock",
    ],
)
def test_default_allow_list_admits_loopback_and_tmp(socket: str) -> None:
    reg, _, _ = make()
    assert reg.subscribe("E_A", socket) is not None


@pytest.mark.parametrize(
    "socket",
    [
        "udp:10.1.2.3:9",
        "udp:128.0.0.1:9",
        "udp:[::2]:9",
        "udp:[::ffff:10.0.0.1]:9",
        "unix:/etc/x",
        "/tmp/../etc/x",
        "unix:/tmpx/y",
        "/run/app/x.sock",
    ],
)
def test_default_allow_list_refuses_the_rest(socket: str) -> None:
    reg, _, changes = make()
    with pytest.raises(NotAllowed) as info:
        reg.subscribe("E_A", socket)
    key = parse_destination(socket, resolve=False).key
    assert info.value.dest == key
    assert key in str(info.value) and "127.0.0.0/8, ::1/128, unix:/tmp/" in str(info.value)
    assert reg.subscribers("E_A") == [] and changes == []


def test_localhost_resolves_to_loopback_and_is_allowed() -> None:
    reg, _, _ = make()
    change = reg.subscribe("E_A", "udp:localhost:9000")
    assert change is not None
    ip = ipaddress.ip_address(change.subscriber.dest.sockaddr[0])
    assert ip.is_loopback
    assert change.subscriber.dest.key == "udp:localhost:9000"


def test_runtime_dir_is_allowed_by_default() -> None:
    allow = AllowList.default("/run/event-datagram")
    assert allow.unix_prefixes == ("/tmp/", "/run/event-datagram/")
    reg, _, _ = make(allow=allow)
    assert reg.subscribe("E_A", "unix:/run/event-datagram/worker.sock") is not None
    for refused in ("unix:/run/event-datagramx/w.sock", "/run/event-datagram/../x.sock"):
        with pytest.raises(NotAllowed):
            reg.subscribe("E_A", refused)
    assert AllowList.default().unix_prefixes == ("/tmp/",)


def test_custom_allow_list() -> None:
    allow = AllowList.parse(["10.0.0.0/8", "unix:/run/app", "::1"])
    assert allow.networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert allow.unix_prefixes == ("/run/app/",)
    reg, _, _ = make(allow=allow)
    reg.subscribe("E_A", "udp:10.1.2.3:9")
    reg.subscribe("E_A", "/run/app/x.sock")
    for refused in ("udp:127.0.0.1:9", "/run/apple/x.sock", "/tmp/x.sock"):
        with pytest.raises(NotAllowed, match=re.escape("10.0.0.0/8, ::1/128, unix:/run/app/")):
            reg.subscribe("E_A", refused)


def test_allow_list_parse_normalises_and_deduplicates() -> None:
    allow = AllowList.parse(
        ["/tmp/", "unix:/tmp", "/srv/../run/app/", "127.0.0.0/8", "127.0.0.0/8"]
    )
    assert allow.unix_prefixes == ("/tmp/", "/run/app/")
    assert allow.networks == (ipaddress.ip_network("127.0.0.0/8"),)
    empty = AllowList.parse([])
    assert str(empty) == "empty"
    with pytest.raises(NotAllowed, match="empty"):
        empty.check(parse_destination("udp:127.0.0.1:9"))


@pytest.mark.parametrize(
    "item", ["10.0.0.1/8", "garbage", "300.0.0.0/8", "unix:relative/dir", "", "udp:127.0.0.1"]
)
def test_allow_list_parse_errors_name_the_item(item: str) -> None:
    with pytest.raises(ValueError, match="allow-list item") as info:
        AllowList.parse(["127.0.0.0/8", item])
    assert repr(item) in str(info.value)


def test_unresolved_destination_is_not_allowed() -> None:
    dest = parse_destination("udp:localhost:9000", resolve=False)
    with pytest.raises(NotAllowed, match="not resolved"):
        AllowList.default().check(dest)


# -- nothing half-registered, change feed ----------------------------------------------


def test_nothing_half_registered_when_subscribe_fails(tmp_path: Path) -> None:
    reg, _, changes = make(tmp_path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    state = (tmp_path / "state.json").read_bytes()
    del changes[:]
    failures: list[tuple[object, type[Exception]]] = [
        ("udp:127.0.0.1:70000", AddressError),
        ("tcp:127.0.0.1:9000", AddressError),
        ("unix:rel.sock", AddressError),
        ("udp:10.1.2.3:9", NotAllowed),
        (None, AddressError),
    ]
    for socket, error in failures:
        with pytest.raises(error):
            reg.subscribe("E_A", socket)  # type: ignore[arg-type]
    with pytest.raises(UnknownEvent):
        reg.subscribe("E_NOPE", "udp:127.0.0.1:9001")
    assert keys(reg) == ["udp:127.0.0.1:9000"]
    assert changes == []
    assert (tmp_path / "state.json").read_bytes() == state
    assert reg.events() == [("E_A", 0), ("E_B", 1)]


def test_failed_write_leaves_the_registry_unchanged(tmp_path: Path) -> None:
    reg, clock, changes = make(state_file=tmp_path / "missing-dir" / "state.json")
    reg.subscribe("E_A", "udp:127.0.0.1:9000", None)  # static: nothing to write
    assert reg.next_expiry() is None
    with pytest.raises(StateFileError, match="cannot write"):
        reg.subscribe("E_A", "udp:127.0.0.1:9001")
    with pytest.raises(StateFileError):
        reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)  # static -> expiring needs a write
    assert [(s.dest.key, s.expire) for s in reg.subscribers("E_A")] == [
        ("udp:127.0.0.1:9000", None)
    ]
    assert summary(changes) == [("added", "E_A", "udp:127.0.0.1:9000")]
    clock.advance(10**6)
    assert reg.sweep() == []
    assert reg.next_expiry() is None


def test_change_feed_for_a_scenario(tmp_path: Path) -> None:
    reg, clock, changes = make(tmp_path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    reg.subscribe("E_A", "unix:/tmp/ev.sock", 10)
    reg.subscribe("E_B", "udp:[::1]:9001", None)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    clock.advance(10)
    reg.subscribers("E_A")
    reg.unsubscribe("E_A", "udp:127.0.0.1:9000")
    reg.unsubscribe("E_A", "udp:127.0.0.1:9000")
    reg.subscribe("E_B", "udp:[::1]:9001", 0)
    assert summary(changes) == [
        ("added", "E_A", "udp:127.0.0.1:9000"),
        ("added", "E_A", "unix:/tmp/ev.sock"),
        ("added", "E_B", "udp:[::1]:9001"),
        ("refreshed", "E_A", "udp:127.0.0.1:9000"),
        ("removed", "E_A", "unix:/tmp/ev.sock"),
        ("removed", "E_A", "udp:127.0.0.1:9000"),
        ("removed", "E_B", "udp:[::1]:9001"),
    ]
    assert [c.event_id for c in changes] == [0, 0, 1, 0, 0, 0, 1]
    assert changes[3].subscriber.expire == 60
    assert changes[4].subscriber.expire == 10  # the removed one, as it was


def test_changes_are_reported_after_the_state_file_is_written(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def on_change(change: Change) -> None:
        entries = read_state(str(tmp_path / "state.json")) or []
        seen.append([e.socket for e in entries])

    reg = Registry(state_file=tmp_path / "state.json", on_change=on_change)
    reg.register_event("E_A")
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    reg.unsubscribe("E_A", "udp:127.0.0.1:9000")
    assert seen == [["udp:127.0.0.1:9000"], []]


# -- persistence -------------------------------------------------------------------------


def test_round_trip_keeps_remaining_time_and_order(tmp_path: Path) -> None:
    reg, clock, _ = make(tmp_path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 100)
    clock.advance(1.25)
    reg.subscribe("E_A", "unix:/tmp/ev.sock", 30)
    reg.subscribe("E_B", "udp:[::1]:9001", 3600)
    reg.subscribe("E_A", "udp:localhost:9002", 2)
    reg.subscribe("E_A", "udp:127.0.0.1:9003", None)  # static: not persisted
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 100)  # refreshed at T0+1.25, keeps its place

    later = Clock(T0 + 21.25)
    changes: list[Change] = []
    new = Registry(
        state_file=tmp_path / "state.json",
        clock=later,
        on_change=changes.append,
        unknown_events="register",
    )
    new.register_event("E_OTHER")
    assert new.load() == 3
    assert new.events() == [("E_OTHER", 0), ("E_A", 1), ("E_B", 2)]  # registered from the file
    got = [(s.dest.key, s.expire, s.subscribed_at, s.ttl(later())) for s in new.subscribers("E_A")]
    assert got == [
        ("unix:/tmp/ev.sock", 30, T0 + 1.25, 10),
        ("udp:127.0.0.1:9000", 100, T0 + 1.25, 80),
    ]
    (b,) = new.subscribers("E_B")
    assert (b.dest.key, b.ttl(later())) == ("udp:[::1]:9001", 3580)
    assert b.dest.sockaddr == ("::1", 9001, 0, 0)
    assert summary(changes) == [
        ("added", "E_A", "udp:127.0.0.1:9000"),
        ("added", "E_A", "unix:/tmp/ev.sock"),
        ("added", "E_B", "udp:[::1]:9001"),
    ]
    # the file was tidied: the expired localhost entry is gone
    entries = read_state(str(tmp_path / "state.json"))
    assert entries is not None
    assert [e.socket for e in entries] == [
        "udp:127.0.0.1:9000",
        "unix:/tmp/ev.sock",
        "udp:[::1]:9001",
    ]


def test_state_file_format(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    reg, clock, _ = make(tmp_path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)  # no file yet: a snapshot
    clock.advance(0.5)
    reg.subscribe("E_A", "/tmp/x.sock", 30)  # then one journal line per change
    reg.subscribe("E_B", "udp:127.0.0.1:9001", 90)
    reg.unsubscribe("E_A", "udp:127.0.0.1:9000")
    a, x, b = (
        {"event": "E_A", "socket": "udp:127.0.0.1:9000", "expire": 60, "subscribed_at": T0},
        {"event": "E_A", "socket": "unix:/tmp/x.sock", "expire": 30, "subscribed_at": T0 + 0.5},
        {"event": "E_B", "socket": "udp:127.0.0.1:9001", "expire": 90, "subscribed_at": T0 + 0.5},
    )
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"version": 2, "subscriptions": [a]},
        {"op": "set", **x},
        {"op": "set", **b},
        {"op": "del", "event": "E_A", "socket": "udp:127.0.0.1:9000"},
    ]
    # 4 records for 2 live subscriptions; one more would be more than half dead: the
    # file is compacted into a snapshot instead.
    reg.subscribe("E_B", "udp:127.0.0.1:9001", 90)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"version": 2, "subscriptions": [x, b]}
    ]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    reg, clock, _ = make(tmp_path)
    for i in range(30):
        reg.subscribe("E_A", f"udp:127.0.0.1:{9000 + i}", 1 + i % 3)
        clock.advance(0.5)
        reg.sweep()
    reg.save()
    assert os.listdir(tmp_path) == ["state.json"]
    assert read_state(str(tmp_path / "state.json")) is not None


def test_static_subscriptions_are_never_written(tmp_path: Path) -> None:
    reg, _, _ = make(tmp_path)
    path = tmp_path / "state.json"
    reg.subscribe("E_A", "udp:127.0.0.1:9999", None)
    reg.unsubscribe("E_A", "udp:127.0.0.1:9999")
    assert not path.exists()
    reg.subscribe("E_A", "udp:127.0.0.1:9999", 60)  # now expiring: written
    assert [e.socket for e in read_state(str(path)) or []] == ["udp:127.0.0.1:9999"]
    reg.subscribe("E_A", "udp:127.0.0.1:9999", None)  # static again: taken out of the file
    assert read_state(str(path)) == []
    reg.save()
    assert read_state(str(path)) == []


def test_load_without_a_file(tmp_path: Path) -> None:
    reg, _, changes = make(tmp_path)
    assert reg.load() == 0 and changes == []
    assert not (tmp_path / "state.json").exists()
    assert Registry().load() == 0
    Registry().save()  # no state file: nothing to do


def test_load_keeps_what_cannot_be_restored_now_in_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    entries = [
        {"event": "E_A", "socket": "udp:127.0.0.1:9000", "expire": 60, "subscribed_at": T0},
        {"event": "E_A", "socket": "udp:127.0.0.1:0", "expire": 60, "subscribed_at": T0},
        {"event": "E_A", "socket": "udp:10.1.2.3:9", "expire": 60, "subscribed_at": T0},
        {"event": "E_NEW", "socket": "/etc/x.sock", "expire": 60, "subscribed_at": T0},
        {"event": "E_A", "socket": "udp:127.0.0.1:9001", "expire": 5, "subscribed_at": T0},
    ]
    path.write_text(json.dumps({"version": 1, "subscriptions": entries}))
    reg, _, changes = make(tmp_path, clock=Clock(T0 + 5), unknown_events="register")
    with caplog.at_level(logging.WARNING, logger="engine.subscriptions"):
        assert reg.load() == 1
    assert keys(reg) == ["udp:127.0.0.1:9000"]
    assert [e for e, _ in reg.events()] == ["E_A", "E_B"]  # E_NEW only had a dropped entry
    for bad in ("udp:127.0.0.1:0", "udp:10.1.2.3:9", "unix:/etc/x.sock"):
        assert any(bad in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    # Logged, not restored, and not lost: kept in the file until they expire.
    assert [e.socket for e in read_state(str(path)) or []] == [
        "udp:127.0.0.1:9000",
        "udp:127.0.0.1:0",
        "udp:10.1.2.3:9",
        "/etc/x.sock",
    ]
    assert len(changes) == 1


def test_load_refreshes_a_static_subscription_of_the_same_socket(tmp_path: Path) -> None:
    reg, _, _ = make(tmp_path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    again, _, changes = make(tmp_path, clock=Clock(T0 + 1))
    again.subscribe("E_A", "udp:127.0.0.1:8000", None)
    again.subscribe("E_A", "udp:127.0.0.1:9000", None)  # from the config, say
    del changes[:]
    assert again.load() == 1
    assert summary(changes) == [("refreshed", "E_A", "udp:127.0.0.1:9000")]
    assert [(s.dest.key, s.expire) for s in again.subscribers("E_A")] == [
        ("udp:127.0.0.1:9000", 60),
        ("udp:127.0.0.1:8000", None),
    ]


CORRUPT = {
    "garbage": (b"\x00\xffnot json at all", "corrupt"),
    "empty": (b"", "truncated"),
    "truncated": (b'{"version":1,"subscriptions":[{"event":"E_A","sock', "truncated"),
    "version": (b'{"version":3,"subscriptions":[]}', "unsupported version 3"),
    "no-version": (b'{"subscriptions":[]}', "version"),
    "not-object": (b"[1,2,3]", "Expected `object`"),
    "expire-type": (
        b'{"version":1,"subscriptions":[{"event":"E_A","socket":"udp:127.0.0.1:9000",'
        b'"expire":"60","subscribed_at":1.0}]}',
        "$.subscriptions[0].expire",
    ),
    "negative-expire": (
        b'{"version":1,"subscriptions":[{"event":"E_A","socket":"udp:127.0.0.1:9000",'
        b'"expire":-1,"subscribed_at":1.0}]}',
        "$.subscriptions[0].expire",
    ),
    "bad-event": (
        b'{"version":1,"subscriptions":[{"event":"E A","socket":"udp:127.0.0.1:9000",'
        b'"expire":60,"subscribed_at":1.0}]}',
        "$.subscriptions[0].event",
    ),
    "unknown-field": (
        b'{"version":1,"subscriptions":[{"event":"E_A","socket":"udp:127.0.0.1:9000",'
        b'"expire":60,"subscribed_at":1.0,"x":1}]}',
        "unknown field `x`",
    ),
    "huge-time": (
        b'{"version":1,"subscriptions":[{"event":"E_A","socket":"udp:127.0.0.1:9000",'
        b'"expire":60,"subscribed_at":1e999}]}',
        "$.subscriptions[0].subscribed_at",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_state_file_is_reported_and_never_overwritten(tmp_path: Path, case: str) -> None:
    content, reason = CORRUPT[case]
    path = tmp_path / "state.json"
    path.write_bytes(content)
    reg, clock, changes = make(tmp_path)
    with pytest.raises(StateFileError) as info:
        reg.load()
    assert str(path) in str(info.value) and reason in str(info.value)
    assert info.value.path == str(path)
    # a persisted subscription cannot be made without writing the file: refused, unchanged
    with pytest.raises(StateFileError, match="not overwriting"):
        reg.subscribe("E_A", "udp:127.0.0.1:9000")
    with pytest.raises(StateFileError, match="not overwriting"):
        reg.save()
    assert reg.subscribers("E_A") == []
    # static subscriptions and sweeps still work, and never touch the file
    reg.subscribe("E_A", "udp:127.0.0.1:9001", None)
    clock.advance(10**6)
    assert reg.sweep() == []
    assert summary(changes) == [("added", "E_A", "udp:127.0.0.1:9001")]
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == ["state.json"]
    # the operator fixes it (here: removes it), loads again, and saving works again
    path.unlink()
    assert reg.load() == 0
    reg.subscribe("E_A", "udp:127.0.0.1:9000")
    assert [e.socket for e in read_state(str(path)) or []] == ["udp:127.0.0.1:9000"]


def test_unreadable_state_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    reg, _, _ = make(tmp_path)
    with pytest.raises(StateFileError, match="cannot read"):
        reg.load()
    with pytest.raises(StateFileError):
        reg.subscribe("E_A", "udp:127.0.0.1:9000")


def test_an_existing_file_is_not_overwritten_before_it_was_loaded(tmp_path: Path) -> None:
    first, _, _ = make(tmp_path)
    first.subscribe("E_A", "udp:127.0.0.1:9000")
    content = (tmp_path / "state.json").read_bytes()
    second, _, _ = make(tmp_path)
    with pytest.raises(StateFileError, match="load"):
        second.subscribe("E_A", "udp:127.0.0.1:9001")
    assert second.subscribers("E_A") == []
    assert (tmp_path / "state.json").read_bytes() == content
    assert second.load() == 1
    second.subscribe("E_A", "udp:127.0.0.1:9001")
    assert len(read_state(str(tmp_path / "state.json")) or []) == 2


# -- a random walk against a model ------------------------------------------------------

SOCKETS = {  # as typed -> printed key
    "udp:127.0.0.1:9000": "udp:127.0.0.1:9000",
    "udp:127.0.0.10:9000": "udp:127.0.0.10:9000",
    "udp:[::1]:9000": "udp:[::1]:9000",
    "udp:localhost:9000": "udp:localhost:9000",
    "/tmp/a": "unix:/tmp/a",
    "unix:/tmp/a": "unix:/tmp/a",
    "unix:/tmp/ab": "unix:/tmp/ab",
}
EVENTS = ["E_A", "E_B"]
Model = dict[str, dict[str, tuple[int | None, float]]]  # event -> key -> (expire, at), oldest first


class RegistryMachine(RuleBasedStateMachine):
    """The registry against a dict that mirrors it, with lazy removal at the same moments."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="subs-test-")
        self.path = os.path.join(self.dir, "state.json")
        self.clock = Clock()
        self.model: Model = {e: {} for e in EVENTS}
        self.start()

    def start(self) -> None:
        self.replay: dict[str, dict[str, Subscriber]] = {e: {} for e in EVENTS}
        self.reg = Registry(state_file=self.path, clock=self.clock, on_change=self.apply)
        for event in EVENTS:
            self.reg.register_event(event)
        self.reg.load()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def apply(self, change: Change) -> None:
        table, key = self.replay[change.event], change.subscriber.dest.key
        assert change.event_id == EVENTS.index(change.event)
        if change.kind == "added":
            assert key not in table
            table[key] = change.subscriber
        elif change.kind == "refreshed":
            assert key in table
            table[key] = change.subscriber
        else:
            assert table.pop(key) == change.subscriber

    def expired(self, expire: int | None, at: float) -> bool:
        return expire is not None and self.clock() >= at + expire

    def purge(self) -> None:
        """What a sweep removes: the expired subscribers of every event."""
        for table in self.model.values():
            for key in [k for k, (x, at) in table.items() if self.expired(x, at)]:
                del table[key]

    @rule(
        event=st.sampled_from(EVENTS),
        socket=st.sampled_from(sorted(SOCKETS)),
        expire=st.sampled_from([None, 0, 1, 2, 5, 3600]),
    )
    def subscribe(self, event: str, socket: str, expire: int | None) -> None:
        self.purge()
        table, key = self.model[event], SOCKETS[socket]
        change = self.reg.subscribe(event, socket, expire)
        if expire == 0:
            assert (change is None) == (table.pop(key, None) is None)
            return
        assert change is not None
        assert change.kind == ("refreshed" if key in table else "added")
        table[key] = (expire, self.clock())

    @rule(event=st.sampled_from(EVENTS), socket=st.sampled_from(sorted(SOCKETS)))
    def unsubscribe(self, event: str, socket: str) -> None:
        self.purge()
        change = self.reg.unsubscribe(event, socket)
        assert (change is None) == (self.model[event].pop(SOCKETS[socket], None) is None)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1, 1.75, 2, 4, 3600]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(event=st.sampled_from(EVENTS))
    def listing(self, event: str) -> None:
        self.purge()
        got = [(s.dest.key, s.expire, s.subscribed_at) for s in self.reg.subscribers(event)]
        want = [(k, x, at) for k, (x, at) in reversed(self.model[event].items())]
        assert got == want

    @rule(event=st.sampled_from(EVENTS), socket=st.sampled_from(sorted(SOCKETS)))
    def find(self, event: str, socket: str) -> None:
        self.purge()
        sub = self.reg.find(event, socket)
        entry = self.model[event].get(SOCKETS[socket])
        assert (None if sub is None else (sub.expire, sub.subscribed_at)) == entry

    @rule()
    def sweep(self) -> None:
        self.purge()
        self.reg.sweep()

    @rule()
    def restart(self) -> None:
        self.purge()  # what load() leaves out
        for event in EVENTS:
            table = self.model[event]
            for key in [k for k, (x, _) in table.items() if x is None]:
                del table[key]
        self.start()

    @rule()
    def crash_in_an_append(self) -> None:
        """A crash that left half of the next journal line: ignored at load."""
        if os.path.exists(self.path):
            with open(self.path, "ab") as f:
                f.write(b'{"op":"set","event":"E_A","socket":"udp:127.0.0.1:1","expi')
        self.restart()

    @invariant()
    def replayed_changes_equal_the_model(self) -> None:
        for event in EVENTS:
            got = [(k, s.expire, s.subscribed_at) for k, s in self.replay[event].items()]
            assert got == [(k, x, at) for k, (x, at) in self.model[event].items()]

    @invariant()
    def next_expiry_is_the_earliest(self) -> None:
        instants = [at + x for t in self.model.values() for x, at in t.values() if x is not None]
        assert self.reg.next_expiry() == (min(instants) if instants else None)

    @invariant()
    def state_file_holds_the_expiring_subscriptions(self) -> None:
        entries = read_state(self.path) or []
        # In list order per event (the journal interleaves events).
        entries.sort(key=lambda e: EVENTS.index(e.event))
        got = [(e.event, e.socket, e.expire, e.subscribed_at) for e in entries]
        want = [
            (event, k, x, at)
            for event in EVENTS
            for k, (x, at) in self.model[event].items()
            if x is not None
        ]
        assert got == want

    @invariant()
    def the_journal_stays_shorter_than_twice_the_live_subscriptions(self) -> None:
        state = load_state(self.path)
        if state is not None:
            assert state.records <= 2 * len(state.entries)


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(max_examples=75, stateful_step_count=40, deadline=None)
