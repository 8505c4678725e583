"""The MI commands: names, parameter recipes, and what each one does.

Each command has an OpenSIPS 4.x namespaced name (what ``which`` lists), the
legacy name OpenSIPS 3.x tools use, and the recipes (accepted parameter
lists) that ``which <command>`` prints and that the request is matched
against, exactly like OpenSIPS's ``get_cmd_recipe``: positional params match a
recipe by count; named params must have the count and every name of one.

Parameters are read like OpenSIPS's ``get_mi_string_param`` /
``get_mi_int_param``: a string parameter may also be given as a number (it is
used as its integer text), an integer parameter as a number (truncated toward
zero and clamped to 32 bits, so ``1.5`` is 1) or as a string of digits
(``"30"``); anything else is -32602 "Bad type for parameter '<name>'".
"""

from __future__ import annotations

import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

import msgspec

from engine.address import AddressError
from engine.errors import EngineError, MIError
from engine.mi.protocol import INVALID_PARAMS, METHOD_NOT_FOUND, SERVER_ERROR
from engine.subscriptions import (
    DEFAULT_EXPIRE,
    NotAllowed,
    StateFileError,
    Subscriber,
    SubscriptionError,
    UnknownEvent,
)
from engine.targets import VIRTUAL, parse_filter, parse_target
from engine.wire import PayloadTooLarge, WireError, repeated_key

if TYPE_CHECKING:
    from engine.producer import Engine

INT_MIN: Final = -(2**31)
INT_MAX: Final = 2**31 - 1
_INT_TEXT: Final = re.compile(r"[+-]?[0-9]{1,20}")


def _bad_type(name: str) -> MIError:
    return MIError(INVALID_PARAMS, "Invalid params", f"Bad type for parameter '{name}'")


def _version() -> str:
    try:
        return metadata.version("event-datagram")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
        return "0.1.0"


SERVER: Final = f"event-datagram ({_version()} ({platform.machine()}/{sys.platform}))"
"""What ``version`` reports, in OpenSIPS's "NAME (VERSION (ARCH/OS))" shape."""


class Params:
    """The request's parameters, by the names of the recipe they matched."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def has(self, name: str) -> bool:
        return name in self._values

    def value(self, name: str) -> Any:
        return self._values[name]

    def string(self, name: str) -> str:
        value = self._values.get(name)
        if isinstance(value, str):
            if not value:
                raise _bad_type(name)
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(_clamp(value))
        raise _bad_type(name)

    def integer(self, name: str) -> int:
        value = self._values.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _clamp(value)
        if isinstance(value, str) and _INT_TEXT.fullmatch(value):
            number = int(value)
            if INT_MIN <= number <= INT_MAX:
                return number
        raise _bad_type(name)


def _clamp(number: float) -> int:
    """cJSON's valueint: truncated toward zero, saturated to a C int."""
    if number >= INT_MAX:
        return INT_MAX
    if number <= INT_MIN:
        return INT_MIN
    return int(number)


Recipe = tuple[str, ...]


def match_recipe(recipes: tuple[Recipe, ...], params: list[Any] | dict[str, Any] | None) -> Params:
    """Pick the recipe the params fit (OpenSIPS get_cmd_recipe); -32602 if none does."""
    reason = "Too few or too many parameters"
    match: Recipe | None = None
    for recipe in recipes:
        if params is None:
            if not recipe:
                return Params({})
            continue
        if not recipe or len(recipe) != len(params):
            continue
        if isinstance(params, list):
            match = match or recipe
            continue
        reason = "Named parameters do not match"
        if all(name in params for name in recipe):
            return Params({name: params[name] for name in recipe})
    if match is None or not isinstance(params, list):
        raise MIError(INVALID_PARAMS, "Invalid params", reason)
    return Params(dict(zip(match, params, strict=True)))


# -- the commands --------------------------------------------------------------------------


def _subscribe(engine: Engine, p: Params) -> object:
    event = p.string("event")
    socket = p.string("socket")
    expire = DEFAULT_EXPIRE
    if p.has("expire"):
        expire = p.integer("expire")
        if expire < 0:
            raise MIError(INVALID_PARAMS, "Invalid params", "Negative expire value")
    try:
        filt = _filter(p)
    except ValueError as exc:  # beyond OpenSIPS: say what is wrong with it
        raise MIError(400, "Bad parameter value", str(exc)) from None
    try:
        engine.event_id(event)  # lock-free: the engine's own event lookup
        # Resolve a host name here, not under the engine lock (the raise path takes it).
        dest = parse_target(socket) if expire else socket
        engine.subscribe(event, dest, expire, filt)
    except NotAllowed as exc:
        raise MIError(400, "Bad parameter value", str(exc)) from None
    except AddressError as exc:  # a group's reason is told (OpenSIPS has none to match)
        data = str(exc) if socket.startswith(VIRTUAL) else None
        raise MIError(400, "Bad parameter value", data) from None
    except UnknownEvent:
        raise MIError(400, "Bad parameter value") from None
    except StateFileError as exc:
        raise MIError(SERVER_ERROR, "Server error", str(exc)) from None
    except (SubscriptionError, ValueError) as exc:
        raise MIError(400, "Bad parameter value", str(exc)) from None
    return "OK"


def _events(engine: Engine, p: Params) -> object:
    with engine.lock:
        events = engine.registry.events()
    return {"Events": [{"name": name, "id": eid} for name, eid in events]}


def _filter(p: Params) -> Any:
    """The `filter` param (beyond OpenSIPS: its clients never send it): a string of
    conditions or an array of them; AddressError when it is neither."""
    if not p.has("filter"):
        return None
    value = p.value("filter")
    if not isinstance(value, (str, list)):
        raise AddressError("filter: expected a string or an array of strings")
    return parse_filter(value)


def _subscriber(sub: Subscriber, now: float) -> dict[str, object]:
    out: dict[str, object]
    if sub.expire is None:
        out = {"socket": sub.dest.key, "expire": "never"}
    else:
        ttl = sub.ttl(now)
        out = {
            "socket": sub.dest.key,
            "expire": sub.expire,
            "ttl": ttl if ttl is not None and ttl > 0 else "expired",
        }
    if sub.filter is not None:  # beyond OpenSIPS: only filtered subscribers show it
        out["filter"] = sub.filter.text
    return out


def _subscribers(engine: Engine, p: Params) -> object:
    registry = engine.registry
    if not p.has("event"):
        listing = []
        with engine.lock:
            now = time.time()
            for name, eid in registry.events():
                subs = registry.subscribers(name)
                if subs:
                    entries = [_subscriber(s, now) for s in subs]
                    listing.append({"name": name, "id": eid, "Subscribers": entries})
        return {"Events": listing}
    event = p.string("event")
    socket = p.string("socket") if p.has("socket") else None
    try:
        filt = _filter(p)
    except ValueError:
        raise MIError(404, "Subscriber does not exist") from None
    with engine.lock:
        now = time.time()
        try:
            eid = registry.event_id(event)
            if socket is not None:
                found = registry.find(event, socket, filt)
                if found is None:
                    raise MIError(404, "Subscriber does not exist")
                return {"Event": {"name": event, "id": eid, "Subscriber": _subscriber(found, now)}}
            subs = registry.subscribers(event)
        except UnknownEvent:
            raise MIError(404, "Event not published") from None
    if not subs:
        return {"Event": {}}
    entries = [_subscriber(s, now) for s in subs]
    return {"Event": {"name": event, "id": eid, "Subscribers": entries}}


_decode_object: Final = msgspec.json.Decoder().decode


def _event_params(value: object) -> list[Any] | dict[str, Any] | None:
    """OpenSIPS's raise_event ``params``: a JSON-object string or an array.

    Differences (docs/mi.md): an array is sent as a JSON array with its values as
    given, and the object's values are kept as given (no stringifying, no int32).
    """
    if isinstance(value, list):
        return value or None
    if isinstance(value, str):
        try:
            parsed = _decode_object(value.encode())
        except (msgspec.DecodeError, UnicodeError, RecursionError):
            raise MIError(400, "Bad Params") from None
        if not isinstance(parsed, dict):
            raise MIError(400, "Bad Params")
        # The payload is encoded from what was decoded: a key given twice (at any
        # depth) would lose one of its values silently (docs/notifications.md).
        try:
            repeated = repeated_key(value)
        except WireError as exc:
            raise MIError(400, "Bad Params", str(exc)) from None
        if repeated is not None:
            raise MIError(400, "Bad Params", f"key {repeated!r} given twice")
        return parsed
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise MIError(400, "Bad Params")
    raise MIError(400, "No Params")


def _raise(engine: Engine, p: Params) -> object:
    event = p.string("event")
    try:
        engine.event_id(event)  # lock-free: not behind a state-file write
    except UnknownEvent:
        raise MIError(404, "Event not registered") from None
    params = _event_params(p.value("params")) if p.has("params") else None
    try:
        result = engine.raise_event(event, params)
    except UnknownEvent:
        raise MIError(404, "Event not registered") from None
    except PayloadTooLarge as exc:
        raise MIError(400, "Payload Too Large", str(exc)) from None
    except WireError as exc:
        raise MIError(400, "Bad Params", str(exc)) from None
    except EngineError as exc:
        raise MIError(SERVER_ERROR, "Server error", str(exc)) from None
    if result.no_subscribers:
        raise MIError(480, "Temporarily Unavailable")
    if not result.queued:
        total = result.workers_queued + result.workers_dropped
        why = f"ring full: dropped for {result.workers_dropped} of {total} worker(s)"
        raise MIError(503, "Event Dropped", why)
    return "OK"


def _which(engine: Engine, p: Params) -> object:
    if not p.has("command"):
        return list(COMMANDS)
    command = lookup(p.string("command"))
    if command is None:
        raise MIError(404, "unknown MI command")
    return [list(recipe) for recipe in command.recipes]


def _version_cmd(engine: Engine, p: Params) -> object:
    return {"Server": SERVER}


def _uptime(engine: Engine, p: Params) -> object:
    now = time.time()
    return {
        "Now": time.ctime(now),
        "Up since": time.ctime(engine.started_at),
        "Up time": f"{max(0, int(now - engine.started_at))} [sec]",
    }


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # namespaced, as `which` lists it
    legacy: str | None  # the OpenSIPS 3.x name
    recipes: tuple[Recipe, ...]
    run: Callable[[Engine, Params], object]
    # Accepted with named params only and not listed by `which` (beyond OpenSIPS:
    # `filter`), so the replies OpenSIPS's clients get stay byte-identical.
    extra: tuple[Recipe, ...] = ()


# In OpenSIPS's registration order (the order `which` lists them).
COMMANDS: Final = {
    c.name: c
    for c in (
        Command("core:uptime", None, ((),), _uptime),
        Command("core:version", None, ((),), _version_cmd),
        Command("core:which", None, ((), ("command",)), _which),
        Command(
            "evi:subscribe",
            "event_subscribe",
            (("event", "socket"), ("event", "socket", "expire")),
            _subscribe,
            (("event", "socket", "expire", "filter"), ("event", "socket", "filter")),
        ),
        Command("evi:list", "events_list", ((),), _events),
        Command(
            "evi:subscribers",
            "subscribers_list",
            ((), ("event",), ("event", "socket")),
            _subscribers,
            (("event", "socket", "filter"),),
        ),
        Command("evi:raise", "raise_event", (("event",), ("event", "params")), _raise),
    )
}
_LEGACY: Final = {c.legacy: c for c in COMMANDS.values() if c.legacy}
_LOCAL: Final = {name.partition(":")[2]: c for name, c in COMMANDS.items()}


def lookup(name: str) -> Command | None:
    """Find a command by namespaced name, legacy name, or bare local name (``version``)."""
    return COMMANDS.get(name) or _LEGACY.get(name) or (None if ":" in name else _LOCAL.get(name))


def run(engine: Engine, method: str, params: list[Any] | dict[str, Any] | None) -> object:
    """Run one command; return its result or raise MIError."""
    command = lookup(method)
    if command is None:
        raise MIError(METHOD_NOT_FOUND, "Method not found")
    # `filter` is named only: positional requests stay exactly OpenSIPS's.
    recipes = command.recipes + command.extra if isinstance(params, dict) else command.recipes
    return command.run(engine, match_recipe(recipes, params))
