"""The fast path of the broker source (engine/sources/amqp.py): whole deliveries
read straight from the bytes pika has read, without pika's per-frame objects.

pika makes three frame objects of each message (a Basic.Deliver, a
BasicProperties decoded) and passes them through its callback layers, about
35 us of CPU a message here: it was the limit of the source (the relay costs
~3 us a message). So while a session consumes, its connection
(DeliveryConnection, a SelectConnection whose _on_data_available comes first)
takes the whole messages to our consumer off the front of pika's frame buffer
itself (take_deliveries: the method, header and body frames read with
struct.unpack_from in one loop, the body sliced out; ~3 us a message). Whatever
else comes (heartbeats, replies, Basic.Cancel, Channel.Close, the stale queue's
messages, a frame not as expected) goes to pika's own _read_frame /
_process_frame, one frame at a time at a frame boundary, so pika's state stays
its own; a message not yet wholly read waits for the next read. Properties are
decoded (by pika) only with max_age_ms, for a message whose flags say it has
headers or a timestamp.

This uses pika internals (Connection._on_data_available, _frame_buffer,
_read_frame, _trim_frame_buffer, _process_frame, bytes_received,
frames_received); connection_type() checks them once (pika_internals_problem,
which also reads back frames pika marshals) and, if they are not as expected,
returns plain pika.SelectConnection (slower, logged once) and why.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("event_datagram.amqp")


def too_old(properties: Any, max_age_s: float) -> bool:
    """Whether the message says it was published more than max_age_s ago."""
    headers = properties.headers
    if headers and isinstance(sent_ms := headers.get("timestamp_in_ms"), int):
        return time.time() - sent_ms / 1000.0 > max_age_s
    sent = properties.timestamp
    return isinstance(sent, int) and time.time() - sent > max_age_s


# -- the fast path for deliveries -------------------------------------------------------------
# AMQP 0-9-1 frames: type (1 method, 2 content header, 3 body, 8 heartbeat), channel,
# payload size, payload, 0xCE. A delivery is a Basic.Deliver method frame (class 60,
# method 60: consumer tag, delivery tag, redelivered, exchange, routing key), a header
# frame (class, weight, body size, property flags, properties) and body frames holding
# body-size bytes, one per frame_max - 8 bytes, none for an empty body; nothing else on
# the channel between them.

_FRAME = struct.Struct(">BHI")  # type, channel, payload size: 7 bytes, then the payload
_HEADER = struct.Struct(">BHIHHQH")  # a header frame to its first property flags: 21 bytes
_TAG = struct.Struct(">Q")
FRAME_END: Final = 0xCE
_DELIVER_ARGS: Final = b"\x00\x3c\x00\x3c"  # class 60 (Basic), method 60 (Deliver)
_PROPERTIES_AT: Final = 19  # header frame offset of its property flags
_HEADERS_OR_TIMESTAMP: Final = (1 << 13) | (1 << 6)  # BasicProperties.FLAG_HEADERS, _TIMESTAMP


class Deliveries:
    """What take_deliveries took off a buffer: `used` bytes in `frames` frames, the
    bodies appended to the batch, `stale` too old by their own timestamp, the newest
    delivery tag; `waiting`: it stopped at a frame (or a delivery) not wholly there."""

    __slots__ = ("frames", "messages", "stale", "tag", "used", "waiting")

    def __init__(self) -> None:
        self.used = self.frames = self.messages = self.stale = self.tag = 0
        self.waiting = False


def take_deliveries(
    buf: bytes, channel: int, consumer_tag: bytes, bodies: list[bytes], max_age_s: float
) -> Deliveries:
    """Take the whole deliveries to `consumer_tag` on `channel` off the front of `buf`
    (AMQP frames as read), appending their bodies to `bodies` (or counting them stale:
    max_age_s and a publish time older than that in their properties). Stops at the
    first frame that does not begin such a delivery, or that is incomplete, or at a
    delivery not wholly in `buf` (`waiting`), so the caller hands pika the rest at a
    frame boundary. No frame, method or properties objects are made but for the
    properties of a message with headers or a timestamp when max_age_s is set."""
    took = Deliveries()
    args = _DELIVER_ARGS + bytes((len(consumer_tag),)) + consumer_tag
    head = _FRAME.unpack_from
    end = len(buf)
    pos = 0
    while True:
        if end - pos < 8:  # a frame is 8 bytes at least
            took.waiting = True
            break
        kind, chan, size = head(buf, pos)
        method_end = pos + 7 + size  # where its 0xCE is
        if method_end >= end:
            took.waiting = True
            break
        if kind != 1 or chan != channel or not buf.startswith(args, pos + 7):
            break  # not a delivery of ours: pika's
        if buf[method_end] != FRAME_END:
            break  # pika raises InvalidFrameError for it
        (tag,) = _TAG.unpack_from(buf, pos + 7 + len(args))
        at = method_end + 1  # the header frame
        if end - at < 22:
            took.waiting = True
            break
        kind, chan, size, class_id, _weight, body_size, flags = _HEADER.unpack_from(buf, at)
        header_end = at + 7 + size
        if header_end >= end:
            took.waiting = True
            break
        if kind != 2 or chan != channel or class_id != 60 or buf[header_end] != FRAME_END:
            break
        frames = 2
        body_at = header_end + 1
        if body_size:
            if end - body_at < 8:
                took.waiting = True
                break
            kind, chan, size = head(buf, body_at)
            body_end = body_at + 7 + size
            if body_end >= end:
                took.waiting = True
                break
            if kind != 3 or chan != channel or buf[body_end] != FRAME_END or size > body_size:
                break
            if size == body_size:  # one body frame: the usual case
                body = buf[body_at + 7 : body_end]
                frames = 3
                body_at = body_end + 1
            else:  # larger than frame_max
                several = _several_body_frames(buf, body_at, channel, body_size)
                if several is None:
                    break
                if not several[0]:
                    took.waiting = True
                    break
                _, body, frames, body_at = several
                frames += 2
        else:
            body = b""
        if (
            max_age_s
            and flags & _HEADERS_OR_TIMESTAMP
            and too_old(_properties(buf, at + _PROPERTIES_AT), max_age_s)
        ):
            took.stale += 1
        else:
            bodies.append(body)
        took.messages += 1
        took.frames += frames
        took.tag = tag
        pos = body_at
    took.used = pos
    return took


def _several_body_frames(
    buf: bytes, at: int, channel: int, body_size: int
) -> tuple[bool, bytes, int, int] | None:
    """The body frames from `at` that hold body_size bytes: (True, body, frames, the
    position after them), (False, ...) when not all there yet, None when something
    else comes first (pika's to see)."""
    chunks: list[bytes] = []
    got = 0
    end = len(buf)
    while got < body_size:
        if end - at < 8:
            return False, b"", 0, at
        kind, chan, size = _FRAME.unpack_from(buf, at)
        frame_end = at + 7 + size
        if frame_end >= end:
            return False, b"", 0, at
        if kind != 3 or chan != channel or buf[frame_end] != FRAME_END:
            return None
        got += size
        if got > body_size:
            return None  # pika raises BodyTooLongError for it
        chunks.append(buf[at + 7 : frame_end])
        at = frame_end + 1
    return True, b"".join(chunks), len(chunks), at


def _properties(buf: bytes, at: int) -> Any:
    import pika.spec

    return pika.spec.BasicProperties().decode(buf, at)


@functools.cache
def connection_type() -> tuple[Any, str]:
    """pika.SelectConnection with the fast path, and "" ; or, when pika's internals
    are not those it was written against, pika.SelectConnection itself and why."""
    import pika

    problem = pika_internals_problem()
    if problem:
        log.warning("amqp: pika %s: %s; pika parses every delivery", pika.__version__, problem)
        return pika.SelectConnection, problem

    class DeliveryConnection(pika.SelectConnection):  # type: ignore[misc]
        """While `take` is set (a session consuming), whole deliveries are taken off
        the front of the frame buffer by it; any other frame goes through pika's own
        _read_frame / _process_frame, at a frame boundary, as in
        Connection._on_data_available. bytes_received (which the heartbeat checker
        watches) and frames_received count both."""

        take: Callable[[bytes], Deliveries] | None = None
        _frame_buffer: bytes  # pika's (Connection._init_connection_state)
        bytes_received: int
        frames_received: int

        def _on_data_available(self, data_in: bytes) -> None:
            self._frame_buffer += data_in
            while self._frame_buffer:
                take = self.take
                if take is not None:
                    buf = self._frame_buffer
                    took = take(buf)
                    if took.used:
                        self._frame_buffer = buf[took.used :]
                        self.bytes_received += took.used
                        self.frames_received += took.frames
                    if took.waiting or not self._frame_buffer:
                        return
                consumed, value = self._read_frame()
                if not value:
                    return
                self._trim_frame_buffer(consumed)
                self._process_frame(value)

    return DeliveryConnection, ""


def pika_internals_problem() -> str:
    """Why the fast path cannot rely on this pika (its private parts it uses), or ""."""
    import pika
    import pika.frame
    import pika.spec

    connection = pika.connection.Connection
    uses = {  # pika's methods the override stands in for or calls: the names they use
        "_on_data_available": {
            "_frame_buffer",
            "_read_frame",
            "_trim_frame_buffer",
            "_process_frame",
        },
        "_read_frame": {"_frame_buffer"},
        "_trim_frame_buffer": {"_frame_buffer", "bytes_received"},
        "_process_frame": {"frames_received"},
    }
    for name, names in uses.items():
        code = getattr(getattr(connection, name, None), "__code__", None)
        if code is None:
            return f"no Connection.{name}"
        if not names <= set(code.co_names):
            return f"Connection.{name} no longer uses {', '.join(sorted(names))}"
    basic = pika.spec.Basic
    if (
        pika.spec.FRAME_END != FRAME_END
        or basic.Deliver.INDEX != 0x003C003C
        or pika.spec.BasicProperties.FLAG_HEADERS | pika.spec.BasicProperties.FLAG_TIMESTAMP
        != _HEADERS_OR_TIMESTAMP
    ):
        return "unexpected AMQP constants"
    # The frames pika would send for a delivery, read back by the fast path.
    wire = b"".join(
        (
            pika.frame.Method(3, basic.Deliver("ctag", 77, False, "x", "k")).marshal(),
            pika.frame.Header(3, 5, pika.spec.BasicProperties(timestamp=1)).marshal(),
            pika.frame.Body(3, b"ab").marshal(),
            pika.frame.Body(3, b"cde").marshal(),
            pika.frame.Heartbeat().marshal(),
        )
    )
    bodies: list[bytes] = []
    took = take_deliveries(wire, 3, b"ctag", bodies, 1.0)
    if (bodies, took.stale, took.tag, took.frames) != ([], 1, 77, 4) or wire[took.used] != 8:
        return "its frames are not read back as expected"
    return ""
