"""Virtual groups and filters: OpenSIPS event_virtual's syntax, identity, hostile input."""

from __future__ import annotations

import pytest

from engine.address import AddressError
from engine.subscriptions import AllowList, Registry
from engine.targets import (
    MAX_FILTER_BYTES,
    MAX_MEMBERS,
    Group,
    parse_filter,
    parse_group,
    parse_target,
    subscription_key,
)

A, B, C = "udp:127.0.0.1:9001", "udp:127.0.0.1:9002", "unix:/tmp/rt-c.sock"


@pytest.mark.parametrize("policy", ["PARALLEL", "FAILOVER", "ROUND-ROBIN", "HASH(callid)"])
def test_printed_as_opensips_lists_it_single_spaces(policy: str) -> None:
    group = parse_group(f"virtual:\t {policy} \t{A}   {B}\t{C}")
    assert group.key == f"virtual:{policy} {A} {B} {C}"
    assert [m.key for m in group.members] == [A, B, C]


def test_a_bare_unix_path_member_prints_with_its_transport() -> None:
    assert parse_group("virtual:FAILOVER /tmp/x.sock").key == "virtual:FAILOVER unix:/tmp/x.sock"


def test_identity_is_ordered_except_for_parallel() -> None:
    def key(text: str) -> str:
        target = parse_target(text)
        assert isinstance(target, Group)
        return subscription_key(target, None)

    assert key(f"virtual:PARALLEL {A} {B}") == key(f"virtual:PARALLEL {B} {A}")
    assert key(f"virtual:FAILOVER {A} {B}") != key(f"virtual:FAILOVER {B} {A}")
    assert key(f"virtual:ROUND-ROBIN {A} {B}") != key(f"virtual:ROUND-ROBIN {B} {A}")
    assert key(f"virtual:FAILOVER {A} {B}") != key(f"virtual:ROUND-ROBIN {A} {B}")
    assert key(f"virtual:HASH(a) {A} {B}") != key(f"virtual:HASH(b) {A} {B}")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("virtual:", "no policy"),
        ("virtual:   \t", "no policy"),
        ("virtual:FAILOVER", "at least one member"),
        ("virtual:FAILOVER   ", "at least one member"),
        (f"virtual:failover {A}", "upper case"),
        (f"virtual:Round-Robin {A}", "upper case"),
        (f"virtual:RANDOM {A}", "invalid virtual socket type"),
        (f"virtual:PARALLEL{A}", "invalid virtual socket type"),
        (f"virtual:HASH {A}", "HASH(param)"),
        (f"virtual:HASH() {A}", "HASH(param)"),
        (f"virtual:FAILOVER {A} virtual:PARALLEL {B}", "cannot be a member"),
        (f"virtual:FAILOVER {A} {A}", "listed twice"),
        ("virtual:FAILOVER udp:127.0.0.1:0", "port"),
        ("virtual:FAILOVER tcp:127.0.0.1:1", "unknown transport"),
    ],
)
def test_hostile_groups_are_refused_naming_the_part(text: str, why: str) -> None:
    with pytest.raises(AddressError, match=why.replace("(", r"\(").replace(")", r"\)")):
        parse_group(text)


def test_a_thousand_members_is_refused() -> None:
    members = " ".join(f"udp:127.0.0.1:{10000 + i}" for i in range(1000))
    with pytest.raises(AddressError, match=f"1000 members: at most {MAX_MEMBERS}"):
        parse_group(f"virtual:ROUND-ROBIN {members}")
    ok = " ".join(f"udp:127.0.0.1:{10000 + i}" for i in range(MAX_MEMBERS))
    assert len(parse_group(f"virtual:ROUND-ROBIN {ok}").members) == MAX_MEMBERS


def test_filters_parse_canonically() -> None:
    f1 = parse_filter("ip=10.* method=INV?TE")
    f2 = parse_filter(["method=INV?TE", "ip=10.*", "ip=10.*"])
    assert f1 == f2 and f1 is not None
    assert f1.text == "ip=10.* method=INV?TE"
    assert parse_filter(None) is None and parse_filter("  ") is None and parse_filter([]) is None
    assert parse_filter("k=") is not None  # an empty pattern matches an empty value


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("novalue", "name=pattern"),
        ("=x", "name=pattern"),
        ("a=b\x07", "control characters"),
        (["a=1", 5], "a string or a list"),
        (" ".join(f"k{i}=v" for i in range(17)), "at most 16"),
        ("a=" + "x" * (10 * 1024), f"at most {MAX_FILTER_BYTES}"),
    ],
)
def test_hostile_filters_are_refused(spec: object, why: str) -> None:
    with pytest.raises(AddressError, match=why):
        parse_filter(spec)  # type: ignore[arg-type]


def registry() -> Registry:
    reg = Registry(allow=AllowList.parse(["127.0.0.0/8", "/tmp/"]))
    reg.register_event("E")
    return reg


def test_identity_is_event_socket_and_filter() -> None:
    reg = registry()
    assert reg.subscribe("E", A) is not None
    assert reg.subscribe("E", A, filter="ip=10.*") is not None
    assert reg.subscribe("E", A, filter=["ip=10.*"]) is not None  # the same: a refresh
    assert reg.subscribe("E", A, filter="ip=192.*") is not None
    listed = [(s.dest.key, s.filter_text) for s in reg.subscribers("E")]
    assert listed == [(A, "ip=192.*"), (A, "ip=10.*"), (A, "")]
    assert reg.find("E", A) is not None and reg.find("E", A).filter is None  # type: ignore[union-attr]
    assert reg.find("E", A, "ip=10.*") is not None
    assert reg.find("E", A, "ip=11.*") is None
    # An OpenSIPS client's unsubscribe (no filter) removes only the unfiltered one.
    assert reg.subscribe("E", A, 0) is not None
    assert [s.filter_text for s in reg.subscribers("E")] == ["ip=192.*", "ip=10.*"]
    assert reg.unsubscribe("E", A, "ip=10.*") is not None
    assert [s.filter_text for s in reg.subscribers("E")] == ["ip=192.*"]


def test_a_group_is_unsubscribed_as_a_whole_parallel_in_any_order() -> None:
    reg = registry()
    change = reg.subscribe("E", f"virtual:PARALLEL {A} {B}", 60)
    assert change is not None and change.kind == "added"
    again = reg.subscribe("E", f"virtual:PARALLEL  {B}\t{A}", 120)
    assert again is not None and again.kind == "refreshed"
    (sub,) = reg.subscribers("E")
    assert sub.dest.key == f"virtual:PARALLEL {A} {B}" and sub.expire == 120  # as first listed
    assert reg.find("E", f"virtual:PARALLEL {B} {A}") is sub
    assert reg.subscribe("E", f"virtual:PARALLEL {B} {A}", 0) is not None
    assert reg.subscribers("E") == []


def test_every_member_is_allow_listed() -> None:
    reg = registry()
    with pytest.raises(Exception, match="allow-list"):
        reg.subscribe("E", f"virtual:FAILOVER {A} udp:10.1.2.3:9000")
    assert reg.subscribers("E") == []


def test_a_member_that_is_the_engines_own_socket_is_refused_and_counted() -> None:
    from engine.errors import SelfSubscription

    reg = registry()
    reg.guards.own.add("ingest", ("127.0.0.1", 9050))
    with pytest.raises(SelfSubscription, match="own ingest"):
        reg.subscribe("E", f"virtual:ROUND-ROBIN {A} udp:localhost:9050")
    assert reg.subscribers("E") == []
    assert reg.guards.self_refused["subscribe"] == 1
    # A listener opened later drops the group that now points at it, as a whole.
    reg.subscribe("E", f"virtual:FAILOVER {A} unix:/tmp/rt-own.sock", 60)
    reg.subscribe("E", "unix:/tmp/rt-own.sock", 60, filter="ip=1*")
    endpoint = reg.guards.own.add("ingest", "/tmp/rt-own.sock")
    assert endpoint is not None
    dropped = reg.drop_own(endpoint)
    assert len(dropped) == 2 and reg.subscribers("E") == []
