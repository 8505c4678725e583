"""engine/mi/datagram_guard.py: which datagrams the UDP MI answers, and its error
rate limit, with a clock of the test's own."""

from __future__ import annotations

import ipaddress

import pytest

from engine import config
from engine.errors import AddressError, ConfigError
from engine.mi.datagram_guard import (
    LOOPBACK,
    DatagramGuard,
    is_error_reply,
    is_response,
    parse_datagram_allow,
)
from engine.mi.protocol import error_reply
from tests.helpers.support import Clock


def make(**kw: object) -> tuple[DatagramGuard, list[str], Clock]:
    counted: list[str] = []
    clock = Clock(100.0)
    guard = DatagramGuard(count=counted.append, clock=clock, **kw)  # type: ignore[arg-type]
    return guard, counted, clock


@pytest.mark.parametrize(
    "data",
    [
        b'{"jsonrpc":"2.0","result":"OK","id":1}',
        b'{"jsonrpc":"2.0","error":{"code":1,"message":"x"},"id":null}',
        b'{"result":1}',
        b' [{"result":1,"id":1},{"error":{},"id":2}] ',
    ],
)
def test_responses(data: bytes) -> None:
    assert is_response(data)
    guard, counted, _ = make()
    assert not guard.admit(data, "127.0.0.1")
    assert counted == ["response"]


@pytest.mark.parametrize(
    "data",
    [
        b'{"jsonrpc":"2.0","method":"version","id":1}',
        b'{"jsonrpc":"2.0","method":"x","result":1,"id":1}',  # a method: a request
        b"[]",  # an empty batch: the handler answers -32600 (rate-limited)
        b'[{"result":1},{"jsonrpc":"2.0","method":"which","id":2}]',
        b'{"result": not json',
        b"\xff\xfe",
    ],
)
def test_requests_and_garbage_are_handled(data: bytes) -> None:
    guard, counted, _ = make()
    assert guard.admit(data, "127.0.0.1")
    assert counted == []


def test_empty_and_outsiders() -> None:
    guard, counted, _ = make()
    assert not guard.admit(b"", "127.0.0.1")
    assert not guard.admit(b" \r\n\t", "::1")
    assert not guard.admit(b'{"method":"version"}', "10.0.0.1")
    assert not guard.admit(b'{"method":"version"}', "not an address")
    assert guard.admit(b'{"method":"version"}', "::ffff:127.0.0.1")  # mapped: loopback
    assert counted == ["empty", "empty", "source_not_allowed", "source_not_allowed"]


def test_datagram_allow() -> None:
    assert parse_datagram_allow([]) == LOOPBACK
    nets = parse_datagram_allow(["10.0.0.0/8", "2001:db8::1"])
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1/128"))
    guard, _, _ = make(allow=nets)
    assert guard.source_allowed("10.1.2.3") and not guard.source_allowed("127.0.0.1")
    with pytest.raises(AddressError, match=r"mi.datagram_allow 'ten': expected a network"):
        parse_datagram_allow(["ten"])


def test_error_replies_take_tokens_per_source() -> None:
    guard, counted, clock = make(rate=2.0, burst=3.0)
    error = error_reply(-32601, "Method not found")
    assert is_error_reply(error) and not is_error_reply(b'{"jsonrpc":"2.0","result":"OK","id":1}')
    sent = [guard.may_reply(error, "127.0.0.1") for _ in range(5)]
    assert sent == [True, True, True, False, False]
    assert counted == ["rate_limited", "rate_limited"]
    assert guard.may_reply(b'{"jsonrpc":"2.0","result":"OK","id":1}', "127.0.0.1")  # never limited
    assert guard.may_reply(error, "127.0.0.2")  # a bucket of its own
    clock.advance(0.5)  # one token back (2 per second)
    assert [guard.may_reply(error, "127.0.0.1") for _ in range(2)] == [True, False]
    clock.advance(60)  # refilled up to the burst, not beyond
    assert [guard.may_reply(error, "127.0.0.1") for _ in range(4)] == [True, True, True, False]


def test_the_bucket_table_is_bounded() -> None:
    guard, _, _ = make(rate=1.0, burst=1.0, max_sources=3)
    error = error_reply(-32601, "Method not found")
    for i in range(10):
        assert guard.may_reply(error, f"127.0.0.{i}")
    assert len(guard._buckets) == 3
    assert not guard.may_reply(error, "127.0.0.9")  # still remembered: empty


def test_the_config_key_is_checked() -> None:
    assert config.loads('[mi]\ndatagram_allow = ["10.0.0.0/8"]\n').mi.datagram_allow == [
        "10.0.0.0/8"
    ]
    with pytest.raises(ConfigError, match=r"'10.0.0.0/33'.* - at `\$\.mi\.datagram_allow`"):
        config.loads('[mi]\ndatagram_allow = ["10.0.0.0/33"]\n')
