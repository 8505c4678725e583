"""The broker source's fast path (engine/sources/amqp_frames.py): whole Basic.Deliver
messages taken off pika's frame buffer without pika, everything else left to pika
at a frame boundary. The frames are pika's own marshalling of each kind; pika's
parse of the same bytes is the reference.

Also pins the pika internals the fast path relies on: if an upgrade of pika moves
them, these tests fail (and the source falls back to plain pika, logged).
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pika.frame
import pika.spec
import pytest

from engine.sources import amqp_frames
from engine.sources.amqp_frames import Deliveries, connection_type, take_deliveries

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


def connection() -> Any:
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
    return conn


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
    took = take_deliveries(wire, 1, CTAG.encode(), got, 0.0)
    assert got == bodies
    assert (took.used, took.messages, took.tag, took.waiting) == (len(wire), len(sizes), 12, True)
    assert took.frames == sum(len(delivery(body, 1)) for body in bodies)


def test_anything_else_stops_it_at_a_frame_boundary() -> None:
    ours = b"".join(delivery(b"a", 1))
    others = {
        "another consumer": delivery(b"x", 2, ctag="ctag1.other"),
        "a longer tag": delivery(b"x", 2, ctag=CTAG + "0"),
        "another channel": delivery(b"x", 2, channel=2),
        "a heartbeat": [pika.frame.Heartbeat().marshal()],
        "a cancel": [pika.frame.Method(1, pika.spec.Basic.Cancel(CTAG)).marshal()],
        "a lone header": delivery(b"x", 2)[1:],
    }
    for what, frames in others.items():
        got: list[bytes] = []
        took = take_deliveries(ours + b"".join(frames), 1, CTAG.encode(), got, 0.0)
        assert (took.used, got, took.waiting) == (len(ours), [b"a"], False), what


def test_a_delivery_not_wholly_read_waits_for_the_rest() -> None:
    whole = b"".join(delivery(b"b" * 300_000, 9))
    for cut in (1, 7, 8, 40, 60, 100, 200, FRAME_BODY_MAX, len(whole) - 1):
        got: list[bytes] = []
        took = take_deliveries(whole[:cut], 1, CTAG.encode(), got, 0.0)
        assert (took.used, took.messages, took.waiting, got) == (0, 0, True, []), cut


def test_stale_by_their_own_publish_time_only_with_max_age() -> None:
    now = time.time()
    props = {
        "none": None,
        "content type": pika.BasicProperties(content_type="application/json"),
        "fresh ms": pika.BasicProperties(headers={"timestamp_in_ms": int(now * 1000)}),
        "old ms": pika.BasicProperties(headers={"timestamp_in_ms": int(now * 1000) - 9000}),
        "other headers": pika.BasicProperties(headers={"a": "b", "n": 1}),
        "fresh s": pika.BasicProperties(timestamp=int(now)),
        "old s": pika.BasicProperties(timestamp=int(now) - 9),
        "old s, all the rest": pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
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
    for max_age, stale in ((0.0, set()), (5.0, {"old ms", "old s", "old s, all the rest"})):
        got: list[bytes] = []
        took = take_deliveries(wire, 1, CTAG.encode(), got, max_age)
        assert got == [name.encode() for name in props if name not in stale]
        assert (took.stale, took.messages, took.used) == (len(stale), len(props), len(wire))


@pytest.mark.parametrize("chunk", [1, 3, 7, 100, 4096, 1 << 30])
def test_read_in_any_chunks_ours_are_taken_and_the_rest_is_pikas(chunk: int) -> None:
    """Chunks as the socket may deliver them (pika reads 4096 bytes at most)."""
    big = b"m" * 2005  # in three body frames of 1000 bytes at most
    theirs = [
        *delivery(b"stale consumer", 50, ctag="ctag1.stale"),
        pika.frame.Heartbeat().marshal(),
        pika.frame.Method(1, pika.spec.Queue.DeclareOk("q", 5, 1)).marshal(),
    ]
    ours = [b"first", b"", b"p" * 4093, big, b"last"]
    wire = b"".join(
        [
            *delivery(ours[0], 1),
            *theirs[:3],
            *delivery(ours[1], 2),
            *delivery(ours[2], 3, properties=pika.BasicProperties(headers={"h": 1})),
            theirs[3],
            *delivery(ours[3], 4, frame_body_max=1000),
            theirs[4],
            *delivery(ours[4], 5),
        ]
    )
    conn = connection()
    got: list[bytes] = []
    tags: list[int] = []

    def take(buf: bytes) -> Deliveries:
        took = take_deliveries(buf, 1, CTAG.encode(), got, 0.0)
        if took.messages:
            tags.append(took.tag)
        return took

    conn.take = take
    for at in range(0, len(wire), chunk):
        conn._on_data_available(wire[at : at + chunk])
    assert got == ours and tags[-1] == 5
    assert conn._frame_buffer == b"" and conn.bytes_received == len(wire)
    assert [f.marshal() for f in conn.processed] == theirs  # by pika, in order
    assert conn.frames_received == 3 + 2 + 3 + 5 + 3  # ours (pika counts its own)


def test_without_take_every_frame_is_pikas() -> None:
    frames = [*delivery(b"x" * 10, 1), pika.frame.Heartbeat().marshal()]
    conn = connection()
    conn._on_data_available(b"".join(frames))
    assert [f.marshal() for f in conn.processed] == frames
