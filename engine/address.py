"""Subscriber socket syntax: parse, print, resolve (SPEC section 2).

Grammar (case-sensitive, no surrounding whitespace)::

    destination := unix | udp
    unix        := ["unix:"] PATH          absolute, 1-107 bytes UTF-8, no NUL
    udp         := "udp:" host ":" PORT    PORT = ASCII digits, value 1-65535
    host        := IPV4 | NAME | "[" IPV6 "]"

The printed form (``Destination.key``) is the identity of a subscriber:
``udp:127.0.0.1:8081``, ``udp:[::1]:8081``, ``udp:localhost:9000``,
``unix:/tmp/x.sock``. Hosts are printed as written (names are not lowercased,
IPv6 is not recompressed); ports are printed as numbers, so ``:09000`` prints as
``:9000``. Matching is exact on the key: no prefix match, no path normalisation.

Decisions beyond OpenSIPS (see vectors/README.md): ``unix:`` is optional; IPv6
literals in brackets are supported (no zone ids); ports outside 1-65535 are
rejected, not wrapped; relative UNIX paths are rejected. A host made only of
digits and dots must be a strict IPv4 literal (``256.1.1.1``, ``127.1`` and
``010.0.0.1`` are rejected without DNS). A NAME is ASCII letters, digits, ``-``
and ``_`` in dot-separated labels of 1-63 characters (253 in all, optional
trailing dot). Names are resolved once, at parse time, preferring IPv4; a UNIX path's
symbolic links too (``sockaddr`` is the real path, the key stays as written).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Final, Literal

from engine.errors import AddressError

__all__ = [
    "UNIX_PATH_MAX",
    "AddressError",
    "Destination",
    "format_listen",
    "parse_destination",
    "parse_listen",
]

UNIX_PATH_MAX: Final = 107  # bytes; sun_path is 108 including the NUL

_NAME: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?:\.(?!-)[A-Za-z0-9_-]{1,63})*\.?")
_DOTTED: Final = re.compile(r"[0-9.]+")
_PORT: Final = re.compile(r"[0-9]+")

SockAddr = tuple[str, int] | tuple[str, int, int, int] | str


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed subscriber socket. Equality and hash follow ``key`` only."""

    transport: Literal["udp", "unix"]
    host: str
    port: int
    path: str
    family: int = field(compare=False)
    sockaddr: SockAddr = field(compare=False)

    @property
    def key(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"udp:[{self.host}]:{self.port}"
        return f"udp:{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.key


def _fail(text: str, msg: str) -> AddressError:
    plain = text and text.isprintable() and text.strip() == text
    return AddressError(f"{text if plain else repr(text)}: {msg}")


def _parse_unix(text: str, path: str, resolve: bool = False) -> Destination:
    if not path:
        raise _fail(text, "unix socket path is empty")
    if "\x00" in path:
        raise _fail(text, "unix socket path contains a NUL byte")
    if not path.startswith("/"):
        raise _fail(text, f"unix socket path must be absolute, got {path!r}")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail(text, "unix socket path is not valid UTF-8 text") from None
    if size > UNIX_PATH_MAX:
        raise _fail(text, f"unix socket path is {size} bytes, at most {UNIX_PATH_MAX} allowed")
    # Resolved: the allow-list judges, and the workers send to, the real path, so a
    # symbolic link cannot point the engine outside the allow-list.
    real = os.path.realpath(path) if resolve else path
    if len(real.encode("utf-8", "surrogateescape")) > UNIX_PATH_MAX:
        raise _fail(text, f"unix socket path resolves to {real!r}, over {UNIX_PATH_MAX} bytes")
    return Destination("unix", "", 0, path, socket.AF_UNIX, real)


def _parse_port(text: str, port: str) -> int:
    if not port:
        raise _fail(text, "port is empty (expected udp:HOST:PORT)")
    if not _PORT.fullmatch(port):
        raise _fail(text, f"port must be decimal digits 1-65535, got {port!r}")
    digits = port.lstrip("0")  # int() refuses over 4300 digits; leading zeros are allowed
    value = int(digits or "0") if len(digits) <= 5 else 0
    if not 1 <= value <= 65535:
        raise _fail(text, f"port must be 1-65535, got {port!r}")
    return value


def _resolve(text: str, host: str, port: int) -> tuple[int, SockAddr]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        raise _fail(text, f"cannot resolve host {host!r}") from None
    for want in (socket.AF_INET, socket.AF_INET6):
        for family, _type, _proto, _canon, addr in infos:
            if family == want == socket.AF_INET:
                return want, (str(addr[0]), int(addr[1]))
            if family == want and len(addr) == 4:
                return want, (str(addr[0]), int(addr[1]), int(addr[2]), int(addr[3]))
    raise _fail(text, f"cannot resolve host {host!r} to an IPv4 or IPv6 address")


def _parse_udp(text: str, rest: str, resolve: bool) -> Destination:
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise _fail(text, "host has '[' without a closing ']'")
        host, after = rest[1:end], rest[end + 1 :]
        if not after:
            raise _fail(text, "port missing (expected udp:[IPV6]:PORT)")
        if not after.startswith(":"):
            raise _fail(text, f"expected ':' and a port after ']', got {after!r}")
        port_text = after[1:]
        if not host:
            raise _fail(text, "host is empty")
        if "%" in host:
            raise _fail(text, f"host {host!r}: IPv6 zone ids are not supported")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail(text, f"host {host!r} is not a valid IPv6 address") from None
        port = _parse_port(text, port_text)
        return Destination("udp", host, port, "", socket.AF_INET6, (host, port, 0, 0))
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        raise _fail(text, "port missing (expected udp:HOST:PORT)")
    if not host:
        raise _fail(text, "host is empty (expected udp:HOST:PORT)")
    if ":" in host:
        raise _fail(text, f"host {host!r}: an IPv6 address needs brackets, e.g. udp:[::1]:PORT")
    if _DOTTED.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _fail(text, f"host {host!r} is not a valid IPv4 address") from None
        port = _parse_port(text, port_text)
        return Destination("udp", host, port, "", socket.AF_INET, (host, port))
    if len(host) > 253 + host.endswith(".") or not _NAME.fullmatch(host):
        raise _fail(text, f"host {host!r} is not a valid IPv4 address or host name")
    port = _parse_port(text, port_text)
    family, sockaddr = (
        _resolve(text, host, port) if resolve else (int(socket.AF_INET), (host, port))
    )
    return Destination("udp", host, port, "", family, sockaddr)


def parse_destination(text: str, *, resolve: bool = True) -> Destination:
    """Parse a subscriber socket; raise AddressError naming the bad part.

    With ``resolve=False`` host names are not looked up (family AF_INET and
    sockaddr ``(host, port)`` are placeholders) and UNIX paths are not resolved:
    use it only to compute a key.
    """
    if not text:
        raise _fail(text, "destination is empty")
    if text.strip() != text:
        raise _fail(text, "leading or trailing whitespace is not allowed")
    if text.startswith("/"):
        return _parse_unix(text, text, resolve)
    transport, sep, rest = text.partition(":")
    if not sep:
        raise _fail(text, "transport missing (expected udp:HOST:PORT, unix:/PATH or /PATH)")
    if transport == "unix":
        return _parse_unix(text, rest, resolve)
    if transport == "udp":
        return _parse_udp(text, rest, resolve)
    raise _fail(text, f"unknown transport {transport!r} (only 'udp' and 'unix', lowercase)")


# -- listen addresses (MI listeners, `listen`, ingest) ----------------------------------
def parse_listen(text: str, what: str = "address") -> tuple[str, int] | None:
    """Parse ``HOST:PORT`` (``[IPV6]:PORT``); "" or "off" -> None (disabled).

    HOST must be an IP literal (port 0 = any free port). Raises AddressError (a ValueError).
    """
    if text in ("", "off"):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        raise AddressError(f"{what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8558")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{what} {text!r}: {host!r} is not an IP address") from None
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"{what} {text!r}: port must be 0-65535")
    return host, port


def format_listen(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
