"""The fast path of the broker source (engine/sources/amqp.py): deliveries read
straight from the bytes pika reads, without pika's per-frame objects.

Why this is long: the AMQP 0-9-1 delivery reader is one state
machine over one buffer, measured and tuned as a whole.

pika makes three frame objects of each message (a Basic.Deliver, a
BasicProperties decoded) and passes them through its callback layers, about
35 us of CPU a message here: it was the limit of the source (the relay costs
~3 us a message). So while a session consumes, its connection
(DeliveryConnection, a SelectConnection whose _on_data_available comes first)
reads the deliveries to our consumer itself, with a DeliveryReader: a state
machine fed each socket read (pika reads 4,096 bytes at a time) that keeps its
place across reads (in a delivery or not, the body size, the bytes gathered so
far, the bytes of the body frame still to come). So every byte is looked at
once: a body frame's payload goes from the read straight into the body (or is
skipped), and only an incomplete frame head, method or content header waits in
pika's frame buffer for the next read. Time is linear in the message's size.

A message whose content header says it is larger than `max_bytes` is never
gathered: its body frames are skipped as they come, and it is counted
`oversize` (and acknowledged with the rest). With max_age_s, the publish time is
read from the content header without pika and without recursion (publish_time:
the top-level `timestamp_in_ms` header, else the AMQP timestamp; a nested table
or array is skipped by its length), so no header, however deep, can stop the
source; a header that cannot be read is counted `malformed`.

Whatever else comes (heartbeats, replies, Basic.Cancel, Channel.Close, the stale
queue's messages, a frame not as expected) goes to pika's own _read_frame /
_process_frame, one frame at a time at a frame boundary, so pika's state stays
its own; frames of other channels may come between the frames of one of our
deliveries (AMQP allows it) and go to pika the same way.

This uses pika internals (Connection._on_data_available, _frame_buffer,
_read_frame, _trim_frame_buffer, _process_frame, bytes_received,
frames_received); connection_type() checks them once (pika_internals_problem,
which also reads back frames pika marshals) and, if they are not as expected,
returns plain pika.SelectConnection (slower, logged once) and why.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("event_datagram.amqp")


def too_old(properties: Any, max_age_s: float) -> bool:
    """Whether the message (properties pika decoded) says it was published more
    than max_age_s ago."""
    headers = properties.headers
    if headers and isinstance(sent_ms := headers.get("timestamp_in_ms"), int):
        return time.time() - sent_ms / 1000.0 > max_age_s
    sent = properties.timestamp
    return isinstance(sent, int) and time.time() - sent > max_age_s


# -- AMQP 0-9-1 framing ------------------------------------------------------------------------
# Frames: type (1 method, 2 content header, 3 body, 8 heartbeat), channel, payload
# size, payload, 0xCE. A delivery is a Basic.Deliver method frame (class 60, method
# 60: consumer tag, delivery tag, redelivered, exchange, routing key), a header frame
# (class, weight, body size, property flags, properties) and body frames holding
# body-size bytes, one per frame_max - 8 bytes, none for an empty body; no other frame
# of that channel between them.

_FRAME = struct.Struct(">BHI")  # type, channel, payload size: 7 bytes, then the payload
_HEADER = struct.Struct(">HHQH")  # a header payload: class, weight, body size, flags
_WHOLE = struct.Struct(">BHIHHQH")  # a header frame to its property flags: 21 bytes
_TAG = struct.Struct(">Q")
FRAME_END: Final = 0xCE
_DELIVER_ARGS: Final = b"\x00\x3c\x00\x3c"  # class 60 (Basic), method 60 (Deliver)
_HEADERS_OR_TIMESTAMP: Final = (1 << 13) | (1 << 6)  # BasicProperties.FLAG_HEADERS, _TIMESTAMP
DEFAULT_MAX_BYTES: Final = 262_144  # AmqpConfig.max_message_bytes's default

# Basic's properties before `timestamp`, in order, by flag bit: how each is encoded.
_SHORTSTR, _OCTET, _TABLE = 1, 2, 3
_BEFORE_TIMESTAMP: Final = (
    (1 << 15, _SHORTSTR),  # content_type
    (1 << 14, _SHORTSTR),  # content_encoding
    (1 << 13, _TABLE),  # headers
    (1 << 12, _OCTET),  # delivery_mode
    (1 << 11, _OCTET),  # priority
    (1 << 10, _SHORTSTR),  # correlation_id
    (1 << 9, _SHORTSTR),  # reply_to
    (1 << 8, _SHORTSTR),  # expiration
    (1 << 7, _SHORTSTR),  # message_id
)
_TIMESTAMP_FLAG: Final = 1 << 6
# Field values of a table, as pika reads them: the fixed sizes, and the integer ones
# (pika reads "f" and "d" as integers too), by type byte.
_FIXED: Final = {
    ord("t"): 1, ord("b"): 1, ord("B"): 1, ord("U"): 2, ord("u"): 2, ord("s"): 2,
    ord("I"): 4, ord("i"): 4, ord("f"): 4, ord("L"): 8, ord("l"): 8, ord("d"): 8,
    ord("T"): 8, ord("D"): 5, ord("V"): 0,
}  # fmt: skip
_NUMBERS: Final = {
    ord("b"): struct.Struct(">b"), ord("B"): struct.Struct(">B"),
    ord("U"): struct.Struct(">h"), ord("u"): struct.Struct(">H"),
    ord("s"): struct.Struct(">h"), ord("I"): struct.Struct(">i"),
    ord("i"): struct.Struct(">I"), ord("L"): struct.Struct(">q"),
    ord("l"): struct.Struct(">q"), ord("f"): struct.Struct(">f"),
    ord("d"): struct.Struct(">d"),
}  # fmt: skip
_SIZED: Final = frozenset(b"SxFA")  # a 4-byte length, then that many bytes
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TIMESTAMP_IN_MS: Final = b"timestamp_in_ms"


class Malformed(ValueError):
    """Content-header properties that cannot be read."""


def publish_time(buf: bytes, at: int, end: int) -> float | None:
    """The publish time (seconds since the epoch) the properties at buf[at:end] (from
    the property flags on) carry: a top-level header `timestamp_in_ms` that is a
    number, else the AMQP `timestamp` (whole seconds); None without either. Nested
    tables and arrays are skipped by their length, never descended into, so the
    cost is linear in the top level's entries whatever the depth. Raises Malformed."""
    try:
        flags = int.from_bytes(buf[at : at + 2], "big")
        if at + 2 > end:
            raise Malformed("no property flags")
        pos = at + 2
        more = flags
        while more & 1:  # further flag words (none are defined for Basic)
            more = int.from_bytes(buf[pos : pos + 2], "big")
            pos += 2
        sent_ms: float | None = None
        for flag, kind in _BEFORE_TIMESTAMP:
            if not flags & flag:
                continue
            if kind == _SHORTSTR:
                pos += 1 + buf[pos]
            elif kind == _OCTET:
                pos += 1
            else:
                (size,) = _U32.unpack_from(buf, pos)
                pos += 4
                if pos + size > end:
                    raise Malformed("a header table longer than its frame")
                sent_ms = _timestamp_in_ms(buf, pos, pos + size)
                pos += size
            if pos > end:
                raise Malformed("properties longer than their frame")
        if sent_ms is not None:
            return sent_ms / 1000.0
        if flags & _TIMESTAMP_FLAG:
            if pos + 8 > end:
                raise Malformed("properties longer than their frame")
            return float(_U64.unpack_from(buf, pos)[0])
        return None
    except (IndexError, struct.error) as exc:
        raise Malformed(f"truncated properties ({exc})") from None


def _timestamp_in_ms(buf: bytes, pos: int, end: int) -> float | None:
    """The (last) top-level `timestamp_in_ms` of the field table buf[pos:end] that is
    a number, else None."""
    found: float | None = None
    while pos < end:
        name_end = pos + 1 + buf[pos]
        name = buf[pos + 1 : name_end]
        kind = buf[name_end]
        pos = name_end + 1
        size = _FIXED.get(kind)
        if size is None:
            if kind not in _SIZED:
                raise Malformed(f"unknown field type {kind:#04x}")
            size = 4 + _U32.unpack_from(buf, pos)[0]
        if name == _TIMESTAMP_IN_MS:
            number = _NUMBERS.get(kind)
            if number is None:
                found = None  # pika keeps the last value: not a number, not a time
            else:
                value = number.unpack_from(buf, pos)[0]
                found = float(int(value)) if math.isfinite(value) else None
        pos += size
    if pos != end:
        raise Malformed("a header table longer than its size")
    return found


# -- the reader ----------------------------------------------------------------------------------

_IDLE, _IN_HEADER, _BODY, _PAYLOAD, _END = range(5)  # DeliveryReader.state


class DeliveryReader:
    """Reads the deliveries to `consumer_tag` on `channel` out of the bytes of a
    connection, fed read by read (feed), keeping its place in between.

    Each whole message's body is appended to `bodies` (the caller's batch), unless
    it is larger than max_bytes (counted `oversize`, never gathered), too old by the
    publish time it carries (with max_age_s; counted `stale`) or its properties
    cannot be read (with max_age_s; `malformed`). `messages` counts them all and
    `tag` is the newest delivery tag; a message is counted once wholly read (the
    caller takes and zeroes the counters, a batch at a time)."""

    __slots__ = (
        "_args", "_body", "_body_size", "_drop", "_frame_left", "_got", "_keep",
        "_tag", "bodies", "channel", "malformed", "max_age_s", "max_bytes",
        "messages", "on_message", "oversize", "stale", "state", "tag",
    )  # fmt: skip

    def __init__(
        self,
        channel: int,
        consumer_tag: bytes,
        bodies: list[bytes],
        *,
        max_age_s: float = 0.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_message: Callable[[], None] | None = None,
    ) -> None:
        self.channel = channel
        self.on_message = on_message  # called after a feed that read a whole message
        self.bodies = bodies
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._args = _DELIVER_ARGS + bytes((len(consumer_tag),)) + consumer_tag
        self.messages = self.stale = self.oversize = self.malformed = self.tag = 0
        self.state = _IDLE
        self._tag = 0  # the delivery being read
        self._body_size = 0
        self._got = 0  # its body bytes read so far
        self._frame_left = 0  # payload bytes of the current body frame still to come
        self._keep = True  # gather the body (not oversize, stale or malformed)
        self._drop = ""  # else why not: "stale", "oversize", "malformed"
        self._body: bytearray | None = None  # a body of several frames or reads

    @property
    def busy(self) -> bool:
        """In the middle of a delivery."""
        return self.state != _IDLE

    def feed(self, data: bytes, pos: int) -> tuple[int, int, bool]:
        """Read our frames of `data` from `pos`: (where it stopped, frames wholly
        read, pika's). pika's: the frame at the stop is not ours (pika is to read
        it, wholly there or not); else `data` ends there, or an incomplete frame
        begins there that must be whole to be read (kept for the next read).
        Calls on_message once if it read a whole message or more."""
        messages = self.messages
        stopped = self._feed(data, pos)
        if self.messages != messages and self.on_message is not None:
            self.on_message()
        return stopped

    def _feed(self, data: bytes, pos: int) -> tuple[int, int, bool]:
        end = len(data)
        frames = 0
        channel = self.channel
        while pos < end:
            state = self.state
            if state == _PAYLOAD:  # the hot loop of a large message: no parsing
                left = self._frame_left
                if (
                    left < end - pos
                    and left == self._body_size  # the usual: a body in one frame,
                    and data[pos + left] == FRAME_END  # wholly in this read
                ):
                    body = data[pos : pos + left] if self._keep else None
                    pos += left + 1
                    frames += 1
                    self._done(body)
                    continue
                n = min(left, end - pos)
                if self._keep:
                    if self._body is None:
                        self._body = bytearray()
                    self._body += memoryview(data)[pos : pos + n]
                self._frame_left = left - n
                self._got += n
                pos += n
                if not self._frame_left:
                    self.state = _END
                continue
            if state == _END:
                if data[pos] != FRAME_END:
                    self.state = _IDLE  # broken framing: pika raises for it
                    return pos, frames, True
                pos += 1
                frames += 1
                self._finish_frame()
                continue
            if end - pos < 7:
                return pos, frames, False
            kind, chan, size = _FRAME.unpack_from(data, pos)
            if chan != channel:  # another channel's (a heartbeat): pika's, even mid-delivery
                return pos, frames, True
            if state == _BODY:
                if kind != 3 or self._got + size > self._body_size:
                    self.state = _IDLE  # pika raises UnexpectedFrameError / BodyTooLong
                    return pos, frames, True
                self._frame_left = size
                self.state = _PAYLOAD if size else _END
                pos += 7
                continue
            frame_end = pos + 7 + size  # where its 0xCE is
            if state == _IDLE:
                if kind != 1 or frame_end >= end or not data.startswith(self._args, pos + 7):
                    return pos, frames, True  # not a delivery of ours, or not whole yet:
                    # pika's to wait for (it takes whole frames only) and to look at
                if data[frame_end] != FRAME_END:
                    return pos, frames, True
                (self._tag,) = _TAG.unpack_from(data, pos + 7 + len(self._args))
                after = self._whole(data, frame_end + 1, end)
                if after:  # the usual case, read at once
                    pos = after
                    frames += 3
                    continue
                self.state = _IN_HEADER
            else:  # _IN_HEADER
                if kind != 2 or size < 14:
                    self.state = _IDLE
                    return pos, frames, True
                if frame_end >= end:
                    return pos, frames, False
                if data[frame_end] != FRAME_END or not data.startswith(b"\x00\x3c", pos + 7):
                    self.state = _IDLE
                    return pos, frames, True
                self._header(data, pos + 7, frame_end)
            pos = frame_end + 1
            frames += 1
        return pos, frames, False

    def _whole(self, data: bytes, at: int, end: int) -> int:
        """The usual delivery, its method frame read: a header frame and one body
        frame wholly in `data` from `at`, its size within the limit, no publish time
        to read. Reads it (where it ends) or nothing (0: the frames one by one)."""
        if end - at < 22:
            return 0
        kind, chan, size, class_id, _weight, body_size, flags = _WHOLE.unpack_from(data, at)
        body_at = at + 8 + size
        if (
            kind != 2
            or size < 14
            or chan != self.channel
            or class_id != 60
            or body_at + 8 > end
            or data[body_at - 1] != FRAME_END
            or body_size > self.max_bytes
            or (self.max_age_s and flags & _HEADERS_OR_TIMESTAMP)
            or not body_size
        ):
            return 0
        kind, chan, size = _FRAME.unpack_from(data, body_at)
        body_end: int = body_at + 7 + size
        if kind != 3 or chan != self.channel or size != body_size or body_end >= end:
            return 0
        if data[body_end] != FRAME_END:
            return 0
        self.bodies.append(data[body_at + 7 : body_end])  # what _done does, inline
        self.messages += 1
        self.tag = self._tag
        return body_end + 1

    def _header(self, data: bytes, at: int, end: int) -> None:
        _class, _weight, body_size, flags = _HEADER.unpack_from(data, at)
        self._body_size = body_size
        self._got = 0
        self._body = None
        drop = "" if body_size <= self.max_bytes else "oversize"
        if not drop and self.max_age_s and flags & _HEADERS_OR_TIMESTAMP:
            try:
                sent = publish_time(data, at + 12, end)
            except Malformed:
                drop = "malformed"
            else:
                if sent is not None and time.time() - sent > self.max_age_s:
                    drop = "stale"
        self._drop = drop
        self._keep = not drop
        if body_size:
            self.state = _BODY
        else:
            self._done(None if drop else b"")

    def _finish_frame(self) -> None:
        if self._got < self._body_size:
            self.state = _BODY
        elif self._keep:
            self._done(bytes(self._body) if self._body is not None else b"")
        else:
            self._done(None)

    def _done(self, body: bytes | None) -> None:
        """A whole message: its body (None: not to be relayed, counted already)."""
        if body is not None:
            self.bodies.append(body)
        elif self._drop == "oversize":
            self.oversize += 1
        elif self._drop == "stale":
            self.stale += 1
        else:
            self.malformed += 1
        self.messages += 1
        self.tag = self._tag
        self.state = _IDLE
        self._body = None


def take_deliveries(
    buf: bytes,
    channel: int,
    consumer_tag: bytes,
    bodies: list[bytes],
    max_age_s: float = 0.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[DeliveryReader, int, int, bool]:
    """One DeliveryReader fed `buf` whole: (the reader, where it stopped, frames, pika's)."""
    reader = DeliveryReader(channel, consumer_tag, bodies, max_age_s=max_age_s, max_bytes=max_bytes)
    used, frames, pikas = reader.feed(buf, 0)
    return reader, used, frames, pikas


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
        """While `take` is set (a session consuming), its deliveries are read by it
        straight from each read; any other frame goes through pika's own _read_frame
        / _process_frame, at a frame boundary, as in Connection._on_data_available.
        bytes_received (which the heartbeat checker watches) and frames_received
        count both."""

        take: DeliveryReader | None = None
        _frame_buffer: bytes  # pika's (Connection._init_connection_state)
        bytes_received: int
        frames_received: int

        def _on_data_available(self, data_in: bytes) -> None:
            if self.take is None:
                super()._on_data_available(data_in)
                return
            # Only an incomplete frame head, method, content header or frame of
            # pika's waits in the buffer (a frame_max at most): body bytes never do.
            data = self._frame_buffer + data_in if self._frame_buffer else data_in
            pos = 0
            while True:
                reader = self.take  # pika's frames may end the consuming
                if reader is None:
                    self._frame_buffer = data[pos:]
                    super()._on_data_available(b"")
                    return
                stop, frames, pikas = reader.feed(data, pos)
                self.bytes_received += stop - pos
                self.frames_received += frames
                self._frame_buffer = data[stop:]
                if not pikas:
                    return
                consumed, value = self._read_frame()
                if not value:
                    return
                self._trim_frame_buffer(consumed)
                self._process_frame(value)
                data, pos = self._frame_buffer, 0

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
    # The frames pika would send for deliveries, read back by the fast path.
    old_ms = int(time.time() * 1000) - 10_000
    wire = b"".join(
        (
            pika.frame.Method(3, basic.Deliver("ctag", 76, False, "x", "k")).marshal(),
            pika.frame.Header(
                3, 2, pika.spec.BasicProperties(headers={"timestamp_in_ms": old_ms})
            ).marshal(),
            pika.frame.Body(3, b"ab").marshal(),
            pika.frame.Method(3, basic.Deliver("ctag", 77, False, "x", "k")).marshal(),
            pika.frame.Header(3, 5, pika.spec.BasicProperties(timestamp=1)).marshal(),
            pika.frame.Body(3, b"ab").marshal(),
            pika.frame.Body(3, b"cde").marshal(),
            pika.frame.Heartbeat().marshal(),
        )
    )
    bodies: list[bytes] = []
    reader, used, frames, pikas = take_deliveries(wire, 3, b"ctag", bodies, 1.0)
    if (bodies, reader.stale, reader.tag, frames, pikas) != ([], 2, 77, 7, True) or wire[used] != 8:
        return "its frames are not read back as expected"
    return ""
