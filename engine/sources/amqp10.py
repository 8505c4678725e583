"""The body of an AMQP 1.0 message, taken without decoding the message (SPEC section 14).

RabbitMQ stores what a publisher sent over AMQP 0-9-1 in a stream as an AMQP
1.0 message: a sequence of sections, each a described type (0x00, a descriptor,
then the value), in this order, each optional but the body:

    header (0x70, a list)  delivery-annotations (0x71, a map)
    message-annotations (0x72, a map)  properties (0x73, a list)
    application-properties (0x74, a map)
    body: data (0x75, binary) one or more | amqp-sequence (0x76)... | amqp-value (0x77)
    footer (0x78, a map)

`body()` walks the sections by their constructors' sizes only (AMQP 1.0 part
1, 1.2: the high nibble of a constructor tells how many bytes its value takes),
never decoding a map or a list, and returns the data section's bytes exactly as
published: one slice for one data section (what RabbitMQ writes), their
concatenation for several (the body AMQP 1.0 defines). What is not a valid
message (truncated, an unknown constructor, a section out of order or not a
section, a size past the end) raises `NotAmqp10("not_amqp10")`; a valid
message whose body is not data (amqp-value, amqp-sequence) or that has none
raises `NotAmqp10("no_data")`. Nothing is ever read past the end of the buffer,
and a huge declared size costs nothing (it is compared, not allocated).
"""

from __future__ import annotations

from typing import Final

REJECT_REASONS: Final = ("not_amqp10", "no_data")

HEADER: Final = 0x70
FOOTER: Final = 0x78
DATA: Final = 0x75
SEQUENCE: Final = 0x76
VALUE: Final = 0x77
# Symbolic descriptors (part 3, 3.2) mean the same as the numeric ones.
_SYMBOLS: Final = {
    b"amqp:header:list": 0x70,
    b"amqp:delivery-annotations:map": 0x71,
    b"amqp:message-annotations:map": 0x72,
    b"amqp:properties:list": 0x73,
    b"amqp:application-properties:map": 0x74,
    b"amqp:data:binary": 0x75,
    b"amqp:amqp-sequence:list": 0x76,
    b"amqp:amqp-value:*": 0x77,
    b"amqp:footer:map": 0x78,
}
_BODY: Final = (DATA, SEQUENCE, VALUE)
_REPEAT: Final = (DATA, SEQUENCE)  # the sections that may come more than once
_MAX_DEPTH: Final = 32  # described values inside described values: a hostile nest ends here


class NotAmqp10(ValueError):
    """The message is rejected; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _skip(buf: bytes, pos: int, end: int, depth: int = 0) -> int:
    """The position after the value whose constructor is at `pos` (not decoded)."""
    if pos >= end:
        raise NotAmqp10("not_amqp10", "truncated")
    code = buf[pos]
    pos += 1
    if code == 0x00:  # described: a descriptor value, then the value
        if depth >= _MAX_DEPTH:
            raise NotAmqp10("not_amqp10", "described values nested too deep")
        return _skip(buf, _skip(buf, pos, end, depth + 1), end, depth + 1)
    width = code >> 4
    if width == 0x4:
        size = 0
    elif width in (0x5, 0x6, 0x7, 0x8, 0x9):
        size = (1, 2, 4, 8, 16)[width - 0x5]
    elif width in (0xA, 0xC, 0xE):  # variable, compound, array: a 1-byte size
        if pos >= end:
            raise NotAmqp10("not_amqp10", "truncated size")
        size = buf[pos]
        pos += 1
    elif width in (0xB, 0xD, 0xF):  # ... a 4-byte size
        if pos + 4 > end:
            raise NotAmqp10("not_amqp10", "truncated size")
        size = int.from_bytes(buf[pos : pos + 4], "big")
        pos += 4
    else:
        raise NotAmqp10("not_amqp10", f"constructor 0x{code:02x}")
    pos += size
    if pos > end:
        raise NotAmqp10("not_amqp10", f"a value of {size} bytes past the end")
    return pos


def _section(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(section code, position of its value) for the section at `pos`."""
    if buf[pos] != 0x00:
        raise NotAmqp10("not_amqp10", f"not a section at byte {pos}")
    code = buf[pos + 1] if pos + 1 < end else -1
    if code == 0x53 and pos + 2 < end:  # smallulong: what every encoder writes
        return buf[pos + 2], pos + 3
    if code == 0x80 and pos + 10 <= end:  # ulong
        value = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        return (value if value <= 0xFF else -1), pos + 10
    if code in (0xA3, 0xB3):  # symbol
        after = _skip(buf, pos + 1, end)
        head = 3 if code == 0xA3 else 6
        return _SYMBOLS.get(buf[pos + head : after], -1), after
    raise NotAmqp10("not_amqp10", f"bad section descriptor at byte {pos}")


def _rabbitmq_body(m: bytes) -> bytes | None:
    """The fast path: what RabbitMQ writes for an AMQP 0-9-1 message, message-
    annotations, properties, application-properties (each optional, in order, a
    list or a map), then one data section that ends the message: its bytes; None
    for anything else (the full walk decides)."""
    end = len(m)
    pos = 0
    last = 0x71
    try:
        while m[pos] == 0x00 and m[pos + 1] == 0x53:
            code = m[pos + 2]
            kind = m[pos + 3]
            if code == DATA:
                if kind == 0xA0:
                    start = pos + 5
                    stop = start + m[pos + 4]
                elif kind == 0xB0:
                    start = pos + 8
                    stop = start + int.from_bytes(m[pos + 4 : pos + 8], "big")
                else:
                    return None
                return m[start:stop] if stop == end else None
            if code <= last or code > 0x74:
                return None
            if kind == 0xC0 or kind == 0xC1:
                pos += 5 + m[pos + 4]
            elif kind == 0xD0 or kind == 0xD1:
                pos += 8 + int.from_bytes(m[pos + 4 : pos + 8], "big")
            elif kind == 0x45:  # list0
                pos += 4
            else:
                return None
            last = code
    except IndexError:
        pass
    return None


def body(message: bytes) -> bytes:
    """The data section(s) of an encoded AMQP 1.0 message, byte for byte.

    Raises:
        NotAmqp10: `reason` "not_amqp10" (not a valid message) or "no_data".
    """
    fast = _rabbitmq_body(message)
    if fast is not None:
        return fast
    end = len(message)
    if not end:
        raise NotAmqp10("not_amqp10", "empty")
    pos = 0
    last = HEADER - 1  # sections come in order; data may repeat
    data: list[bytes] = []
    other_body = False
    while pos < end:
        if message[pos] == 0x00 and message[pos + 1 : pos + 2] == b"\x53" and pos + 3 < end:
            code, value = message[pos + 2], pos + 3  # smallulong: what every encoder writes
        else:
            code, value = _section(message, pos, end)
        if not HEADER <= code <= FOOTER or code < last or (code == last and code not in _REPEAT):
            raise NotAmqp10("not_amqp10", f"section 0x{code:02x} out of order or unknown")
        if last in _BODY and code in _BODY and code != last:
            raise NotAmqp10("not_amqp10", "a body of data and of values")
        kind = message[value] if value < end else -1
        if code == DATA:
            if kind == 0xA0 and value + 2 <= end:
                start = value + 2
                stop = start + message[value + 1]
            elif kind == 0xB0 and value + 5 <= end:
                start = value + 5
                stop = start + int.from_bytes(message[value + 1 : value + 5], "big")
            else:
                raise NotAmqp10("not_amqp10", "a data section that is not binary")
            if stop > end:
                raise NotAmqp10("not_amqp10", "a data section past the end")
            data.append(message[start:stop])
            pos = stop
        else:
            other_body = other_body or code in _BODY
            if (kind == 0xC0 or kind == 0xC1) and value + 2 <= end:  # list8, map8: inline
                pos = value + 2 + message[value + 1]
                if pos > end:
                    raise NotAmqp10("not_amqp10", "a section past the end")
            else:
                pos = _skip(message, value, end)
        last = code
    if not data:
        raise NotAmqp10("no_data", "the body is an amqp-value" if other_body else "no body")
    return data[0] if len(data) == 1 else b"".join(data)
