"""HTTP/1.x request parsing and the request checks, as pure functions (no sockets).

Parsing is bytes in, a :class:`Request` or a :class:`Status` (an error to answer)
out: :func:`parse_request_line`, :func:`parse_head` and :func:`body_length`,
checked as http.server checks them; :func:`response` makes the bytes of a reply.
engine/mi/server.py runs them on its event loop.

The checks are headers in, a refusal out.

What a browser can be made to send is refused here, so a web page (CSRF) or a
DNS-rebound name cannot drive an MI that listens on loopback:

* a ``POST /mi`` whose ``Content-Type`` is present and not JSON: 415. Without a
  CORS preflight a browser can only send ``text/plain``, form types or no type at
  all; ``application/json`` needs a preflight, which we never grant. opensips-cli
  and python-opensips send ``application/json``; a request with no type at all is
  taken (curl-like tools, our own tests), because a browser that sends no type
  still sends ``Origin`` on every POST (the Fetch standard), and that is checked:
* an ``Origin`` not in ``[mi] allowed_origins``: 403 (``null`` included);
* on a loopback listener, a ``Host`` that is not a loopback address, ``localhost``
  or a name in ``[mi] allowed_hosts``: 421 (a rebound name reaches us under its
  own name). A request without ``Host`` (HTTP/1.0 tools) is taken.

Counted by reason in :class:`SecurityCounters`, which the metrics read.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final, Protocol

JSON_TYPES: Final = frozenset({"application/json", "application/json-rpc"})

# Refusal reasons (the `reason` label of event_datagram_http_requests_refused_total).
ORIGIN: Final = "origin"
HOST: Final = "host"
CONTENT_TYPE: Final = "content_type"


class Headers(Protocol):
    """What the checks read of a request's headers (an email.message.Message, a dict)."""

    def get(self, name: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # ORIGIN, HOST or CONTENT_TYPE
    message: str


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """What one listener accepts. `loopback`: the listener is bound to a loopback
    address (then the Host check applies; beyond loopback, names are the operator's)."""

    loopback: bool
    allowed_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def make(
        cls, loopback: bool, origins: Iterable[str] = (), hosts: Iterable[str] = ()
    ) -> RequestPolicy:
        return cls(
            loopback,
            frozenset(o.rstrip("/").lower() for o in origins),
            frozenset(h.lower() for h in hosts),
        )


def is_loopback_bind(host: str) -> bool:
    """True when a listener bound to `host` is reachable from this host only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def exposure_warning(what: str, listen: str, host: str, authenticated: bool) -> str | None:
    """The start-up warning for an HTTP listener bound beyond loopback without
    authentication, or None."""
    if authenticated or is_loopback_bind(host):
        return None
    return (
        f"{what} listens on {listen} beyond loopback without authentication: anyone who"
        " reaches it can use it; set basic_auth_users in its web config"
        " (docs/security-http.md)"
    )


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8888" -> "::1"."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    name = host_name(header)
    if name == "localhost" or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def media_type(header: str) -> str:
    """The media type of a Content-Type header, without parameters, lower case."""
    return header.split(";", 1)[0].strip().lower()


def check(
    policy: RequestPolicy,
    method: str,
    path: str,
    headers: Headers,
) -> Refusal | None:
    """The refusal for a request, or None when it may go on (authentication aside)."""
    get = headers.get
    origin = get("Origin")
    if origin is not None and origin.strip().rstrip("/").lower() not in policy.allowed_origins:
        return Refusal(403, ORIGIN, f"origin {origin[:80]!r} is not in [mi] allowed_origins")
    if policy.loopback:
        host = get("Host")
        if host is not None and not host_allowed(host, policy.allowed_hosts):
            why = f"host {host[:80]!r} is not a loopback address or in [mi] allowed_hosts"
            return Refusal(421, HOST, why)
    if method == "POST" and path.split("?", 1)[0] == "/mi":
        content_type = get("Content-Type")
        if content_type is not None and media_type(content_type) not in JSON_TYPES:
            why = f"Content-Type {content_type[:80]!r}: the MI takes application/json"
            return Refusal(415, CONTENT_TYPE, why)
    return None


@dataclass
class SecurityCounters:
    """What the HTTP listeners refused, per listener ("mi", "metrics"): written by
    their loop and worker threads, read at scrape time."""

    auth_failures: dict[tuple[str, str], int] = field(default_factory=dict)
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    tls_failures: dict[tuple[str, str], int] = field(default_factory=dict)
    listeners: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, table: dict[tuple[str, str], int], listener: str, reason: str) -> None:
        with self._lock:
            table[listener, reason] = table.get((listener, reason), 0) + 1

    def snapshot(
        self,
    ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self.auth_failures), dict(self.refused), dict(self.tls_failures)


# -- parsing: bytes in, a request or a status out ------------------------------------------

SERVER: Final = "event-datagram"


class Request:
    """One request: its line, then its headers once the head is parsed."""

    __slots__ = ("close", "headers", "method", "path", "verify", "version")

    def __init__(self, method: str, path: str, version: str, close: bool) -> None:
        self.verify = False  # a credential to check with bcrypt (on a worker)
        self.method = method
        self.path = path
        self.version = version  # "HTTP/1.1", "HTTP/1.0", ..., or "HTTP/0.9" (no headers)
        self.close = close  # close the connection after the reply
        self.headers = http.client.HTTPMessage()


@dataclass(frozen=True, slots=True)
class Status:
    """A request that cannot be taken: the status to answer and why."""

    status: int
    message: str


def version_number(version: str) -> tuple[int, int] | None:
    """(major, minor) of "HTTP/x.y", or None when it is not one (as http.server checks)."""
    if not version.startswith("HTTP/"):
        return None
    parts = version[5:].split(".")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 10 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def parse_request_line(line: bytes) -> Request | Status | None:
    """The request line, checked as http.server checks it; None for an empty line
    (the connection is closed without an answer)."""
    text = str(line, "iso-8859-1").rstrip("\r\n")
    words = text.split()
    if not words:
        return None
    version, close = "HTTP/0.9", True
    if len(words) >= 3:
        version = words[-1]
        number = version_number(version)
        if number is None:
            return Status(400, f"Bad request version ({version[:40]!r})")
        if number >= (2, 0):
            return Status(505, f"Invalid HTTP version ({version[5:]})")
        close = number < (1, 1)
    if not 2 <= len(words) <= 3:
        return Status(400, f"Bad request syntax ({text[:80]!r})")
    method, path = words[:2]
    if len(words) == 2 and method != "GET":
        return Status(400, f"Bad HTTP/0.9 request type ({method[:40]!r})")
    if path.startswith("//"):  # as http.server: never taken for a host
        path = "/" + path.lstrip("/")
    return Request(method, path, version, close)


def parse_head(request: Request, head: bytes) -> Status | None:
    """The header lines of `request` (after its request line, up to the blank line):
    sets its headers and whether the connection closes after it."""
    try:
        request.headers = http.client.parse_headers(io.BytesIO(head))
    except http.client.LineTooLong as exc:
        return Status(431, f"Line too long: {exc}")
    except http.client.HTTPException as exc:
        return Status(431, f"Too many headers: {exc}")
    connection = (request.headers.get("Connection") or "").lower()
    if request.version == "HTTP/0.9" or connection == "close":
        request.close = True
    elif connection == "keep-alive":
        request.close = False
    return None


def body_length(request: Request, max_body: int) -> int | Status:
    """The length of a POST body as its headers frame it, or why it is refused."""
    headers = request.headers
    if headers.get("Transfer-Encoding"):
        return Status(501, "chunked request bodies are not supported; send Content-Length")
    lengths = headers.get_all("Content-Length") or []
    if len(set(lengths)) > 1:  # which one frames the body? (request smuggling)
        return Status(400, "conflicting Content-Length headers")
    if not lengths:
        return Status(411, "Content-Length is required")
    text = lengths[0]
    length = int(text) if text.isdigit() and len(text) < 19 else -1
    if length < 0:
        return Status(400, f"bad Content-Length {text[:40]!r}")
    if length > max_body:
        return Status(413, f"request body is {length} bytes, over the {max_body}-byte limit")
    return length


def response(
    req: Request | None,
    status: int,
    body: bytes = b"",
    content_type: str | None = None,
    *,
    close: bool,
    extra: tuple[str, ...] = (),
) -> bytes:
    """The bytes of a reply, as http.server's BaseHTTPRequestHandler would send them."""
    if req is not None and req.version == "HTTP/0.9":
        return body
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Server: {SERVER}",
        f"Date: {formatdate(usegmt=True)}",
    ]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    lines.extend(extra)
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if req is not None and req.method == "HEAD" else head + body
