"""Which MI datagrams the UDP MI answers: it must never be a reflector.

A UDP source address can be forged, so a server that answers whatever arrives
sends its replies (bigger than the request: an amplifier) wherever an attacker
says, and two of them, or one with a forged source, bounce a reply forever.
The rules, in order (each drop counted by reason, never logged one line each):

* ``source_not_allowed``: the source is outside ``[mi] datagram_allow``
  (default: loopback only);
* ``empty``: nothing (or only white space) to answer;
* ``response``: a JSON-RPC response (an object with ``result`` or ``error`` and
  no ``method``), or a batch made only of those: a reply to a reply is what loops;
* ``rate_limited``: an *error* reply to a source whose token bucket is empty
  (``ERROR_RATE`` per second, bursts of ``ERROR_BURST``; at most ``MAX_SOURCES``
  sources are remembered, the least recently seen forgotten first). Successful
  replies are not limited: only an allowed source gets them.

Pure and single-threaded (the datagram server's thread owns one).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec

from engine.errors import AddressError

__all__ = ["ERROR_BURST", "ERROR_RATE", "LOOPBACK", "DatagramGuard", "parse_datagram_allow"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: Final[tuple[IPNetwork, ...]] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
# Error replies per second per source, sustained, and in a burst: far above what a
# client that waits for each reply meets (OpenSIPS's own MI session replayed in
# tests/vectors holds 26 errors), far below what makes a reflector worth using.
ERROR_RATE: Final = 50.0
ERROR_BURST: Final = 100.0
MAX_SOURCES: Final = 4096

_decode: Final = msgspec.json.Decoder().decode
_ERROR_HEAD: Final = b'{"jsonrpc":"2.0","error":'


def parse_datagram_allow(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Source networks the UDP MI answers; [] = loopback. Raises AddressError naming
    the bad item."""
    nets: list[IPNetwork] = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (ValueError, TypeError):
            raise AddressError(
                f"mi.datagram_allow {item!r}: expected a network, e.g. 10.0.0.0/8"
            ) from None
    return tuple(nets) or LOOPBACK


def allows_everything(nets: Iterable[IPNetwork]) -> bool:
    return any(net.prefixlen == 0 for net in nets)


def _is_response(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and "method" not in value
        and ("result" in value or "error" in value)
    )


def is_response(data: bytes) -> bool:
    """A JSON-RPC response or a non-empty batch of responses (never answered)."""
    if b'"result"' not in data and b'"error"' not in data:
        return False  # the common request: no decode
    try:
        value = _decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False  # not JSON: the handler answers -32700 (rate-limited)
    if isinstance(value, list):
        return bool(value) and all(_is_response(v) for v in value)
    return _is_response(value)


def is_error_reply(reply: bytes) -> bool:
    """A reply that is only error(s): the kind rate-limited per source."""
    if reply.startswith(_ERROR_HEAD):
        return True
    return reply.startswith(b"[") and b'"result":' not in reply and b'"error":' in reply


class DatagramGuard:
    """The decisions; counting is the caller's (`count(reason)`)."""

    def __init__(
        self,
        allow: Iterable[IPNetwork] = LOOPBACK,
        *,
        count: Callable[[str], None] = lambda _reason: None,
        rate: float = ERROR_RATE,
        burst: float = ERROR_BURST,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allow = tuple(allow)
        self._count = count
        self._rate = rate
        self._burst = burst
        self._max_sources = max_sources
        self._clock = clock
        self._allowed: dict[str, bool] = {}  # source IP text -> verdict (bounded)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def source_allowed(self, host: str) -> bool:
        verdict = self._allowed.get(host)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            verdict = any(ip in net for net in self.allow)
            if len(self._allowed) < 65536:  # a flood of sources cannot grow it
                self._allowed[host] = verdict
        return verdict

    def admit(self, data: bytes, host: str) -> bool:
        """Whether to handle (and maybe answer) `data` from `host`; a drop is counted."""
        if not self.source_allowed(host):
            self._count("source_not_allowed")
            return False
        if not data.strip():
            self._count("empty")
            return False
        if is_response(data):
            self._count("response")
            return False
        return True

    def may_reply(self, reply: bytes, host: str) -> bool:
        """Whether to send `reply` to `host`: error replies take a token from its bucket;
        a suppressed one is counted `rate_limited`."""
        if not is_error_reply(reply):
            return True
        now = self._clock()
        tokens, at = self._buckets.pop(host, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[host] = (tokens - 1.0 if allowed else tokens, now)  # most recent last
        if len(self._buckets) > self._max_sources:
            self._buckets.popitem(last=False)
        if not allowed:
            self._count("rate_limited")
        return allowed
