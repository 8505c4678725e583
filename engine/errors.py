"""One error hierarchy for everything event-datagram raises on purpose.

A leaf module (it imports nothing of ours), so any module, the workers
included, can raise these without importing the code that catches them.
Where callers have long caught a builtin (`ValueError` for bad input,
`RuntimeError` for an engine that is not running), the builtin stays a base
class, so existing `except` clauses keep working.

    EventDatagramError
      EngineError (RuntimeError)      the engine cannot start, or has stopped
      ConfigError                     the config cannot be used (exit status 2)
      AddressError (ValueError)       a socket or listen address that cannot be used
      WireError (ValueError)          an event that cannot be encoded or relayed
        BadEventName                  an event name outside the rule
        PayloadTooLarge               over MAX_PAYLOAD; nothing is truncated
      SubscriptionError               a subscription request refused
        UnknownEvent, BadExpire, NotAllowed, SelfSubscription
      StateFileError                  the state file is unreadable or cannot be written
      MIError                         an MI error reply (code, message, data)
        BadRequest                    not a valid JSON-RPC request
      MIClientError                   an MI could not be reached / did not answer JSON-RPC
      MIReplyError                    an MI answered with an error
      RunError                        `run`: a listener or the engine could not start
      ListenError                     `listen`: the socket cannot be bound or subscribed
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[EventDatagramError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class EventDatagramError(Exception):
    """The base of every error event-datagram raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable whatever a subclass's __init__ takes (errors cross process
        # boundaries): rebuilt from the message and the attributes, not re-run.
        return (_rebuild, (type(self), self.args, self.__dict__))


class EngineError(EventDatagramError, RuntimeError):
    """The engine cannot start or has stopped (the message says why)."""


class ConfigError(EventDatagramError):
    """The config cannot be used; ``str()`` is the full message for the operator."""


class AddressError(EventDatagramError, ValueError):
    """A subscriber socket or listen address that cannot be used; the message names
    the part."""


class WireError(EventDatagramError, ValueError):
    """The event cannot be encoded; the message names the offending part."""


class BadEventName(WireError):
    """An event name outside the rule (wire.EVENT_NAME_RULE)."""


class PayloadTooLarge(WireError):
    """The encoded payload is bigger than the limit. Nothing is truncated."""

    def __init__(self, event: str, size: int, limit: int) -> None:
        super().__init__(f"event {event} payload is {size} bytes, over the {limit}-byte limit")
        self.event = event
        self.size = size
        self.limit = limit


class SubscriptionError(EventDatagramError):
    """A subscription request was refused; the message names the bad part."""


class UnknownEvent(SubscriptionError):
    def __init__(self, event: str | int) -> None:
        super().__init__(f"unknown event {event!r}")
        self.event = event


class BadExpire(SubscriptionError):
    def __init__(self, expire: object, limit: int) -> None:
        super().__init__(f"bad expire {expire!r}: expected an integer from 0 to {limit}")
        self.expire = expire


class NotAllowed(SubscriptionError):
    def __init__(self, dest: str, allow: object, detail: str = "") -> None:
        super().__init__(f"destination {dest}{detail} is not in the allow-list ({allow})")
        self.dest = dest


class SelfSubscription(SubscriptionError):
    """A destination that is one of the engine's own sockets (it would loop)."""

    def __init__(self, dest: str, reason: str) -> None:
        super().__init__(reason)
        self.dest = dest


class StateFileError(EventDatagramError):
    """The state file is unreadable, corrupt or cannot be written."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"state file {path}: {reason}")
        self.path = path
        self.reason = reason


class MIError(EventDatagramError):
    """An MI error reply: JSON-RPC ``code``, ``message`` and optional ``data``."""

    def __init__(self, code: int, message: str, data: str | None = None) -> None:
        super().__init__(f"{code} {message}" + (f" ({data})" if data else ""))
        self.code = code
        self.message = message
        self.data = data


class BadRequest(MIError):
    """The request is not valid JSON-RPC: answered even without an id, with
    ``id_json`` (the request's id as sent, or ``null``)."""

    def __init__(self, code: int, message: str, data: str | None, id_json: bytes) -> None:
        super().__init__(code, message, data)
        self.id_json = id_json


class MIClientError(EventDatagramError):
    """The MI could not be reached, or its answer was not a JSON-RPC reply.

    `reason` says which: "unreachable", "timeout" (no whole answer by the call's
    deadline), "bad_reply" (not HTTP, cut short, not JSON-RPC) or "too_large"."""

    def __init__(self, message: str, reason: str = "unreachable") -> None:
        super().__init__(message)
        self.reason = reason


class MIReplyError(EventDatagramError):
    """The MI answered with an error."""

    def __init__(self, code: object, message: object, data: object = None) -> None:
        text = f"error {code}: {message}" + (f" ({data})" if data is not None else "")
        super().__init__(text)
        self.code = code
        self.message = message
        self.data = data


class RunError(EventDatagramError):
    """The engine or a listener could not start; the message says why."""


class ListenError(EventDatagramError):
    """`listen` cannot bind its socket or subscribe it."""
