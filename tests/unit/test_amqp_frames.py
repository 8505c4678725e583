"""The broker source's fast path (engine/sources/amqp_frames.py): Basic.Deliver
messages read by a DeliveryReader fed read by read, without pika, everything else
left to pika at a frame boundary; messages over the limit skipped, never gathered;
publish times read from headers of any depth without recursion. The frames are
pika's own marshalling of each kind; pika's parse of the same bytes is the reference.

Also pins the pika internals the fast path relies on: if an upgrade of pika moves
them, these tests fail (and the source falls back to plain pika, logged).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pika
import pika.frame
import pika.spec
import pytest

from engine.sources import amqp_frames
from engine.sources.amqp_frames import (
    DEFAULT_MAX_BYTES,
    DeliveryReader,
    Malformed,
    connection_type,
    publish_time,
    take_deliveries,
    too_old,
)

CTAG = "ctag1.0123456789abcdef"
FRAME_BODY_MAX = 131072 - 8  # the broker's default frame_max, less a frame's framing


def delivery(
    body: bytes,
    tag: int,
    *,
    channel: int = 1,
    ctag: str = CTAG,
    properties: Any = None,
    frame_body_max: int = FRAME_BODY_MAX,
) -> list[bytes]:
    """The frames a broker sends for one delivery, as pika marshals them."""
    frames = [
        pika.frame.Method(
            channel, pika.spec.Basic.Deliver(ctag, tag, False, "opensips", "e.k")
        ).marshal(),
        pika.frame.Header(channel, len(body), properties or pika.spec.BasicProperties()).marshal(),
    ]
    for at in range(0, len(body), frame_body_max):
        frames.append(pika.frame.Body(channel, body[at : at + frame_body_max]).marshal())
    return frames


def connection(**reader: Any) -> Any:
    """A DeliveryConnection that never connects: pika's buffer handling and frame
    decoding, with _process_frame recording what pika would have processed."""
    cls, problem = connection_type()
    assert problem == ""
    conn = cls.__new__(cls)
    conn._frame_buffer = b""
    conn.bytes_received = 0
    conn.frames_received = 0
    conn.processed = []
    conn._process_frame = conn.processed.append
    conn.got = []
    conn.take = DeliveryReader(1, CTAG.encode(), conn.got, **reader)
    return conn


def feed(conn: Any, wire: bytes, chunk: int) -> int:
    """wire to conn in reads of `chunk` bytes: the most bytes its buffer held after one."""
    most = 0
    for at in range(0, len(wire), chunk):
        conn._on_data_available(wire[at : at + chunk])
        most = max(most, len(conn._frame_buffer))
    return most


def raw_header(channel: int, body_size: int, flags: int, properties: bytes) -> bytes:
    """A content header frame with properties encoded by hand (pika's encoder recurses)."""
    payload = struct.pack(">HHQH", 60, 0, body_size, flags) + properties
    return struct.pack(">BHI", 2, channel, len(payload)) + payload + b"\xce"


def field(name: bytes, kind: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + kind + value


def table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def nested(depth: int) -> bytes:
    """A header table `depth` tables deep: {"n": {"n": ... {}}}."""
    inner = b""
    for _ in range(depth):
        inner = field(b"n", b"F", table(inner))
    return inner


def test_the_installed_pika_has_the_internals_the_fast_path_uses() -> None:
    assert amqp_frames.pika_internals_problem() == ""
    cls, problem = connection_type()
    assert problem == "" and issubclass(cls, pika.SelectConnection)
    assert cls is not pika.SelectConnection


def test_a_pika_without_them_means_plain_pika(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pika.connection.Connection, "_read_frame")
    assert amqp_frames.pika_internals_problem() == "no Connection._read_frame"
    cls, problem = connection_type.__wrapped__()
    assert cls is pika.SelectConnection and problem


def test_a_pika_whose_read_loop_changed_means_plain_pika(monkeypatch: pytest.MonkeyPatch) -> None:
    def elsewhere(self: Any, data_in: bytes) -> None:
        self._buffer.extend(data_in)

    monkeypatch.setattr(pika.connection.Connection, "_on_data_available", elsewhere)
    assert "Connection._on_data_available no longer uses" in amqp_frames.pika_internals_problem()


def test_bodies_of_every_size_around_a_frame_are_read_byte_for_byte() -> None:
    sizes = [0, 1, 123, 4096, 65457, FRAME_BODY_MAX - 1, FRAME_BODY_MAX, FRAME_BODY_MAX + 1]
    sizes += [2 * FRAME_BODY_MAX, 2 * FRAME_BODY_MAX + 1, 200_000, 400_000]
    pattern = bytes(range(251)) * (max(sizes) // 251 + 2)
    bodies = [pattern[i : i + n] for i, n in enumerate(sizes)]
    wire = b"".join(b"".join(delivery(body, i + 1)) for i, body in enumerate(bodies))
    got: list[bytes] = []
    reader, used, frames, pikas = take_deliveries(wire, 1, CTAG.encode(), got, 0.0, 1 << 20)
    assert got == bodies
    assert (used, reader.messages, reader.tag, pikas, reader.busy) == (
        len(wire),
        len(sizes),
        12,
        False,
        False,
    )
    assert frames == sum(len(delivery(body, 1)) for body in bodies)


def test_anything_else_stops_it_at_a_frame_boundary() -> None:
    ours = b"".join(delivery(b"a", 1))
    others = {
        "another consumer": delivery(b"x", 2, ctag="ctag1.other"),
        "a longer tag": delivery(b"x", 2, ctag=CTAG + "0"),
        "another channel": delivery(b"x", 2, channel=2),
        "a heartbeat": [pika.frame.Heartbeat().marshal()],
        "a cancel": [pika.frame.Method(1, pika.spec.Basic.Cancel(CTAG)).marshal()],
        "a lone header": delivery(b"x", 2)[1:],
        "a lone body": delivery(b"x", 2)[2:],
    }
    for what, frames in others.items():
        got: list[bytes] = []
        wire = ours + b"".join(frames)
        reader, used, _, pikas = take_deliveries(wire, 1, CTAG.encode(), got, 0.0)
        assert (used, got, pikas, reader.busy) == (len(ours), [b"a"], True, False), what


def test_a_delivery_cut_at_any_byte_is_read_once_whole() -> None:
    """Fed in two reads cut at every byte (frame heads, method, header, body, the
    frame ends): the reader keeps its place, and the body comes once, whole."""
    body = bytes(range(256)) * 9  # in 3 body frames of 1000 bytes at most
    whole = b"".join(delivery(body, 9, frame_body_max=1000)) + b"".join(delivery(b"z", 10))
    for cut in range(1, len(whole)):
        conn = connection()
        conn._on_data_available(whole[:cut])
        assert conn.got in ([], [body]), cut
        conn._on_data_available(whole[cut:])
        assert conn.got == [body, b"z"], cut
        assert (conn.take.messages, conn.take.tag, conn._frame_buffer) == (2, 10, b""), cut
        assert conn.bytes_received == len(whole) and not conn.processed, cut


@pytest.mark.parametrize("frame_body_max", [FRAME_BODY_MAX, 4000, 1])
def test_bodies_around_the_limit_over_it_are_skipped_never_gathered(frame_body_max: int) -> None:
    limit = 10_000
    sizes = [limit - 1, limit, limit + 1, 3 * limit, 0, limit + 4096]
    bodies = [bytes((i,)) * n for i, n in enumerate(sizes)]
    wire = b"".join(
        b"".join(delivery(body, i + 1, frame_body_max=frame_body_max))
        for i, body in enumerate(bodies)
    )
    for chunk in (1, 7, 4096, len(wire)):
        if chunk == 1 and frame_body_max == 1:
            continue  # 200,000 single-byte reads of single-byte frames: slow, says nothing new
        conn = connection(max_bytes=limit)
        most = feed(conn, wire, chunk)
        assert conn.got == [b for b in bodies if len(b) <= limit], chunk
        reader = conn.take
        assert (reader.oversize, reader.messages, reader.tag) == (3, len(sizes), len(sizes))
        assert conn._frame_buffer == b"" and conn.bytes_received == len(wire)
        # an over-limit body never waits in pika's buffer, nor in the reader
        assert most < 2 * 4096 + 30, (chunk, most)


def test_a_huge_message_is_skipped_as_it_comes() -> None:
    """40 MB in 4,096-byte reads (pika's): nothing of it is kept, and the message
    behind it is read."""
    size = 40_000_000
    wire = b"".join(delivery(b"\x00" * size, 1)) + b"".join(delivery(b"next", 2))
    conn = connection()
    most = feed(conn, wire, 4096)
    assert conn.got == [b"next"] and conn.take.oversize == 1 and conn.take.tag == 2
    assert most < 4096 + 30 and conn.take._body is None


def test_the_default_limit_is_a_few_notifications() -> None:
    assert DEFAULT_MAX_BYTES == 262_144 and DEFAULT_MAX_BYTES >= 4 * 65_457


def test_stale_by_their_own_publish_time_only_with_max_age() -> None:
    now = time.time()
    props = {
        "none": None,
        "content type": pika.BasicProperties(content_type="application/json"),
        "fresh ms": pika.BasicProperties(headers={"timestamp_in_ms": int(now * 1000)}),
        "old ms": pika.BasicProperties(headers={"timestamp_in_ms": int(now * 1000) - 9000}),
        "old ms, small int": pika.BasicProperties(headers={"timestamp_in_ms": 5}),
        "other headers": pika.BasicProperties(headers={"a": "b", "n": 1}),
        "fresh s": pika.BasicProperties(timestamp=int(now)),
        "old s": pika.BasicProperties(timestamp=int(now) - 9),
        "fresh ms, old s": pika.BasicProperties(
            headers={"x": {"y": [1, "z"]}, "timestamp_in_ms": int(now * 1000)},
            timestamp=int(now) - 9,
        ),
        "old s, all the rest": pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
            headers={"timestamp_in_ms": "not a number", "t": True, "f": {"n": [1]}},
            delivery_mode=2,
            priority=3,
            correlation_id="c" * 200,
            reply_to="r",
            expiration="60000",
            message_id="m",
            timestamp=int(now) - 9,
            type="t",
            user_id="guest",
            app_id="opensips",
            cluster_id="",
        ),
    }
    wire = b"".join(
        b"".join(delivery(name.encode(), i + 1, properties=p))
        for i, (name, p) in enumerate(props.items())
    )
    old = {"old ms", "old ms, small int", "old s", "old s, all the rest"}
    for max_age, stale in ((0.0, set()), (5.0, old)):
        got: list[bytes] = []
        reader, used, _, _ = take_deliveries(wire, 1, CTAG.encode(), got, max_age)
        assert got == [name.encode() for name in props if name not in stale]
        assert (reader.stale, reader.messages, used) == (len(stale), len(props), len(wire))
    for name, p in props.items():  # the same reading as pika's decoded properties
        if p is not None:
            encoded = b"".join(p.encode())
            sent = publish_time(encoded, 0, len(encoded))
            assert (sent is not None and sent < now - 5) == (name in old), name
            assert too_old(p, 5.0) == (name in old), name


def test_a_header_thousands_deep_is_read_without_recursion() -> None:
    """5,000 tables deep (pika's decoder would hit the recursion limit): the top
    level's timestamp_in_ms after it is found; the next messages are read."""
    old_ms = int(time.time() * 1000) - 60_000
    headers = nested(5000) + field(b"timestamp_in_ms", b"l", struct.pack(">q", old_ms))
    deep_old = raw_header(1, 4, 1 << 13, table(headers))
    deep_only = raw_header(1, 4, 1 << 13, table(nested(5000)))
    wire = b"".join(
        [
            *delivery(b"old!", 1)[:1], deep_old, *delivery(b"old!", 1)[2:],
            *delivery(b"deep", 2)[:1], deep_only, *delivery(b"deep", 2)[2:],
            *delivery(b"next", 3),
        ]
    )  # fmt: skip
    for chunk in (4096, len(wire)):
        conn = connection(max_age_s=5.0)
        feed(conn, wire, chunk)
        assert conn.got == [b"deep", b"next"]
        assert (conn.take.stale, conn.take.malformed, conn.take.tag) == (1, 0, 3)


def test_headers_that_cannot_be_read_are_counted_malformed_and_the_next_read() -> None:
    bad = {
        "unknown field type": table(field(b"a", b"Z", b"")),
        "table longer than its frame": struct.pack(">I", 1000) + b"\x01a",
        "entry past the table": table(field(b"a", b"S", struct.pack(">I", 99))),
        "truncated": table(field(b"timestamp_in_ms", b"l", b"\x00\x01")),
    }
    frames = []
    for i, properties in enumerate(bad.values()):
        frames += [delivery(b"bad", i + 1)[0], raw_header(1, 3, 1 << 13, properties)]
        frames += delivery(b"bad", i + 1)[2:]
    wire = b"".join(frames) + b"".join(delivery(b"good", 9))
    for what, properties in bad.items():
        with pytest.raises(Malformed):
            publish_time(b"\x20\x00" + properties, 0, 2 + len(properties))
        assert what
    conn = connection(max_age_s=5.0)
    feed(conn, wire, 4096)
    assert conn.got == [b"good"] and (conn.take.malformed, conn.take.messages) == (4, 5)
    without_max_age = connection()  # the properties are not read at all
    feed(without_max_age, wire, 4096)
    assert without_max_age.got == [b"bad"] * 4 + [b"good"]


@pytest.mark.parametrize("chunk", [1, 3, 7, 100, 4096, 1 << 30])
def test_read_in_any_chunks_ours_are_taken_and_the_rest_is_pikas(chunk: int) -> None:
    """Chunks as the socket may deliver them (pika reads 4096 bytes at most); frames
    of another channel between the frames of one of ours (AMQP allows it)."""
    big = b"m" * 2005  # in three body frames of 1000 bytes at most
    theirs = [
        *delivery(b"stale consumer", 50, ctag="ctag1.stale"),
        pika.frame.Heartbeat().marshal(),
        pika.frame.Method(1, pika.spec.Queue.DeclareOk("q", 5, 1)).marshal(),
        pika.frame.Heartbeat().marshal(),
        pika.frame.Method(2, pika.spec.Channel.OpenOk()).marshal(),
    ]
    ours = [b"first", b"", b"p" * 4093, big, b"last"]
    big_frames = delivery(ours[3], 4, frame_body_max=1000)
    wire = b"".join(
        [
            *delivery(ours[0], 1),
            *theirs[:3],
            *delivery(ours[1], 2),
            *delivery(ours[2], 3, properties=pika.BasicProperties(headers={"h": 1})),
            theirs[3],
            *big_frames[:3],
            theirs[5],  # between two body frames of ours
            *big_frames[3:],
            theirs[4],
            *delivery(ours[4], 5)[:2],
            theirs[6],  # between the header and the body
            *delivery(ours[4], 5)[2:],
        ]
    )
    conn = connection()
    feed(conn, wire, chunk)
    assert conn.got == ours and conn.take.tag == 5
    assert conn._frame_buffer == b"" and conn.bytes_received == len(wire)
    in_order = [*theirs[:4], theirs[5], theirs[4], theirs[6]]
    assert [f.marshal() for f in conn.processed] == in_order  # by pika, as they came
    assert conn.frames_received == 3 + 2 + 3 + 5 + 3  # ours (pika counts its own)


def test_without_take_every_frame_is_pikas() -> None:
    frames = [*delivery(b"x" * 10, 1), pika.frame.Heartbeat().marshal()]
    conn = connection()
    conn.take = None
    conn._on_data_available(b"".join(frames))
    assert [f.marshal() for f in conn.processed] == frames
