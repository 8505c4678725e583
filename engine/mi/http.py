"""The request checks of the HTTP listeners, as pure functions: headers in, a refusal out.

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

import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
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
