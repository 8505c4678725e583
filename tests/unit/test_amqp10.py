"""engine/sources/amqp10.py: the body of an AMQP 1.0 message, from hand-built
encodings (AMQP 1.0 part 1 and 3), and hostile ones."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sources import amqp10
from engine.sources.amqp10 import NotAmqp10, body

NOTIFICATION = b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"10.0.0.1"}}'


def section(code: int, value: bytes) -> bytes:
    return b"\x00\x53" + bytes([code]) + value


def vbin(data: bytes) -> bytes:
    if len(data) < 256:
        return b"\xa0" + bytes([len(data)]) + data
    return b"\xb0" + struct.pack(">I", len(data)) + data


def sym(name: bytes) -> bytes:
    return b"\xa3" + bytes([len(name)]) + name


def str8(text: bytes) -> bytes:
    return b"\xa1" + bytes([len(text)]) + text


def map8(*items: bytes) -> bytes:
    payload = b"".join(items)
    return b"\xc1" + bytes([len(payload) + 1, len(items)]) + payload


def map32(*items: bytes) -> bytes:
    payload = b"".join(items)
    return b"\xd1" + struct.pack(">II", len(payload) + 4, len(items)) + payload


def list8(*items: bytes) -> bytes:
    payload = b"".join(items)
    return b"\xc0" + bytes([len(payload) + 1, len(items)]) + payload


# What RabbitMQ 3.10 stores for a message pika published (captured from a real broker).
RABBITMQ_STORED = (
    b"\x00Sr\xc1)\x04\xa3\rx-routing-key\xa1\x01k\xa3\nx-exchange\xa1\x08opensips"
    b"\x00Ss\xc0\x16\r@@@@@@@@@\x83\x00\x00\x01\xa2C\x7f\x8b\x90@@@"
    b'\x00Su\xa01{"jsonrpc":"2.0","method":"E_X","params":{"i":0}}'
)


def full_message(data: bytes) -> bytes:
    """Every section before and after the body, in order."""
    return (
        section(0x70, list8(b"\x41", b"\x50\x04"))  # header: durable, priority 4
        + section(0x71, map8(sym(b"x-opt-d"), b"\x40"))
        + section(0x72, map32(sym(b"x-routing-key"), str8(b"E_PIKE_BLOCKED")))
        + section(0x73, list8(b"\x40", b"\x40", str8(b"to")))
        + section(0x74, map8(str8(b"a"), b"\x00\x53\x99\x45"))  # a described value inside
        + section(0x75, vbin(data))
        + section(0x78, map8(sym(b"x-f"), b"\x44"))
    )


def test_rabbitmq_stored_message() -> None:
    assert body(RABBITMQ_STORED) == b'{"jsonrpc":"2.0","method":"E_X","params":{"i":0}}'


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65536, 1 << 20])
def test_every_section_and_sizes(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert body(full_message(data)) == data
    assert body(section(0x75, vbin(data))) == data


def test_several_data_sections_are_one_body() -> None:
    message = section(0x73, list8()) + section(0x75, vbin(b"ab")) + section(0x75, vbin(b"cd"))
    assert body(message) == b"abcd"


def test_ulong_and_symbolic_descriptors() -> None:
    ulong = b"\x00\x80" + struct.pack(">Q", 0x75) + vbin(NOTIFICATION)
    assert body(ulong) == NOTIFICATION
    symbolic = b"\x00" + sym(b"amqp:properties:list") + b"\x45" + b"\x00" + sym(b"amqp:data:binary")
    assert body(symbolic + vbin(NOTIFICATION)) == NOTIFICATION


@pytest.mark.parametrize(
    "message",
    [
        section(0x77, str8(b"a string body")),  # amqp-value
        section(0x76, list8(b"\x40")),  # amqp-sequence
        section(0x73, list8()),  # no body at all
        section(0x72, map8()) + section(0x78, map8()),
    ],
)
def test_no_data_section(message: bytes) -> None:
    with pytest.raises(NotAmqp10) as caught:
        body(message)
    assert caught.value.reason == "no_data"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        NOTIFICATION,  # a JSON body, not AMQP 1.0 at all
        b"\x00",  # a described type cut short
        b"\x00\x53",
        section(0x75, b"\xa0\x10abc"),  # truncated data
        section(0x75, b"\xb0\xff\xff\xff\xffabc"),  # a huge declared size
        section(0x75, b"\xb0\x00\x00"),  # truncated size
        section(0x72, b"\xd1\x7f\xff\xff\xff\x00\x00\x00\x01") + section(0x75, vbin(b"x")),
        section(0x75, str8(b"not binary")),  # data must be binary
        section(0x69, vbin(b"x")),  # not a section
        section(0x79, vbin(b"x")),
        section(0x75, vbin(b"x")) + section(0x73, list8()),  # properties after the body
        section(0x74, map8()) + section(0x72, map8()) + section(0x75, vbin(b"x")),  # order
        section(0x73, list8()) + section(0x73, list8()) + section(0x75, vbin(b"x")),  # twice
        section(0x75, vbin(b"x")) + section(0x77, b"\x40"),  # data and a value
        section(0x75, vbin(b"x")) + b"\x01",  # trailing garbage
        section(0x72, b"\x1f") + section(0x75, vbin(b"x")),  # an unknown constructor
        b"\x00\x80\x00\x00" + vbin(b"x"),  # a truncated ulong descriptor
        b"\x00\x80" + struct.pack(">Q", 1 << 40) + vbin(b"x"),  # a ulong no section has
        b"\x00" + sym(b"amqp:nothing:here") + vbin(b"x"),
        section(0x72, b"\x00" * 100_000),  # described values nested past the limit
        RABBITMQ_STORED[:-1],
        RABBITMQ_STORED[:40],
    ],
)
def test_not_amqp10(message: bytes) -> None:
    with pytest.raises(NotAmqp10) as caught:
        body(message)
    assert caught.value.reason == "not_amqp10"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        got = body(data)
    except NotAmqp10 as exc:
        assert exc.reason in ("not_amqp10", "no_data")
    else:
        assert len(got) <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=10_000))
def test_every_truncation_of_a_valid_message_is_rejected(data: bytes, cut: int) -> None:
    message = full_message(data)
    cut = cut % len(message)
    if cut == 0:
        return
    # a cut at a section boundary leaves a valid, shorter message: only check no crash
    try:
        got = body(message[:cut])
    except NotAmqp10:
        return
    assert got == data  # only possible when the footer alone was cut off


def full_walk(message: bytes) -> bytes | str:
    """body() without its fast path: the bytes, or the reason it rejects."""
    fast = amqp10._rabbitmq_body
    amqp10._rabbitmq_body = lambda _m: None  # type: ignore[assignment]
    try:
        return amqp10.body(message)
    except NotAmqp10 as exc:
        return exc.reason
    finally:
        amqp10._rabbitmq_body = fast


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2000), st.binary(max_size=4))
def test_the_fast_path_agrees_with_the_full_walk(data: bytes, cut: int, junk: bytes) -> None:
    """On RabbitMQ's layout, cut anywhere, and with bytes after it: the same answer."""
    message = (
        section(0x72, map32(sym(b"x-routing-key"), str8(b"k")))
        + section(0x73, b"\x45")
        + section(0x74, map8(str8(b"h"), str8(b"v")))
        + section(0x75, vbin(data))
    )
    for variant in (message, message[: cut % (len(message) + 1)], message + junk):
        try:
            got: bytes | str = body(variant)
        except NotAmqp10 as exc:
            got = exc.reason
        assert got == full_walk(variant)
    assert body(message) == data
