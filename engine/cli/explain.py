"""What the client verbs say when the MI says no: errors a person can act on.

The MI's replies stay OpenSIPS's, byte for byte: 400 "Bad parameter value" for
an unknown event and for a bad socket alike, 480 "Temporarily Unavailable" for
an event nobody listens to. The client works out which it was (asking the MI's
``events_list`` when the event may be unknown, parsing the socket with the
engine's own parser) and puts that first, the MI's error after it in
parentheses: ``unknown event E_NOPE; known: E_A, E_B (error 400: Bad parameter
value)``.

Sockets in the syntax this engine takes (``udp:``, ``unix:``, a path) are
checked before anything is sent. Other transports (``tcp:``, ``rabbitmq:``,
``virtual:``...) are sent as they are, since an OpenSIPS MI may take them,
and explained only if the MI refuses them.
"""

from __future__ import annotations

from typing import Any

from engine.address import parse_destination
from engine.errors import AddressError, MIClientError, MIReplyError
from engine.mi.client import call
from engine.mi.http_client import ClientAuth

KNOWN_SHOWN = 20  # event names listed in "known: ..." before "and N more"


def socket_problem(text: str, *, ours_only: bool) -> str | None:
    """What is wrong with subscriber socket ``text``, or None when it parses.

    With ``ours_only`` a socket of another transport is not judged (None)."""
    if ours_only and ":" in text and not text.startswith(("udp:", "unix:", "/")):
        return None
    try:
        parse_destination(text, resolve=False)
    except AddressError as exc:
        return f"bad socket {exc}"
    return None


def _known_events(target: str, timeout: float, auth: ClientAuth | None) -> list[str] | None:
    """The MI's event names, or None when it cannot tell (not an events_list we know)."""
    try:
        result = call(target, "events_list", [], timeout=timeout, auth=auth)
    except (MIReplyError, MIClientError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("Events"), list):
        return None
    return [str(e.get("name")) for e in result["Events"] if isinstance(e, dict)]


def _unknown_event(event: str, known: list[str]) -> str:
    if not known:
        return f"unknown event {event}; the MI knows no events"
    shown = ", ".join(known[:KNOWN_SHOWN])
    more = len(known) - KNOWN_SHOWN
    return f"unknown event {event}; known: {shown}" + (f" and {more} more" if more > 0 else "")


def explain(
    target: str,
    method: str,
    params: list[Any],
    exc: MIReplyError,
    timeout: float,
    auth: ClientAuth | None = None,
) -> str:
    """The line to print for ``exc``, the MI's error reply to ``method(params)``."""
    why = _why(target, method, params, exc, timeout, auth)
    return f"{why} ({exc})" if why else str(exc)


def _why(
    target: str,
    method: str,
    params: list[Any],
    exc: MIReplyError,
    timeout: float,
    auth: ClientAuth | None,
) -> str | None:
    event = str(params[0]) if params else ""
    code = exc.code
    if method == "raise_event" and code == 480:
        return f"no subscribers for {event}"
    unknown_event = (
        (method == "event_subscribe" and code == 400 and exc.data is None)
        or (method == "raise_event" and code == 404)
        or (method == "subscribers_list" and code == 404 and exc.message == "Event not published")
    )
    if unknown_event:
        known = _known_events(target, timeout, auth)
        if known is not None and event not in known:
            return _unknown_event(event, known)
    if method == "event_subscribe" and code == 400 and len(params) > 1:
        return socket_problem(str(params[1]), ours_only=False)
    if method == "subscribers_list" and code == 404 and len(params) > 1:
        return f"{params[1]} is not subscribed to {event}"
    return None
