"""The datagram payload: one JSON-RPC 2.0 notification per event (SPEC section 1).

Every subscriber of an event receives the same bytes::

    {"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}

Why this module looks the way it does:

* **Encode once.** OpenSIPS rebuilds the JSON for every subscriber; we build the
  payload exactly once per event, here, before it is queued, and the workers
  only copy bytes. This function is on the producer's hot path, so the common
  case (a flat dict or list of str/int) costs one cheap type scan plus a single
  ``msgspec`` encode of a preallocated-layout ``Struct`` (well under 1 us).
* **cJSON-identical bytes.** OpenSIPS prints with cJSON ``PrintUnformatted``:
  compact, keys ``jsonrpc``, ``method``, ``params`` in that order, ``params``
  left out when there are none. ``msgspec`` escapes exactly like cJSON: ``\\"``,
  ``\\\\``, ``\\b \\f \\n \\r \\t``, other control characters as lowercase
  ``\\u00xx``, while DEL and non-ASCII go out as raw UTF-8 and ``/`` is not
  escaped. The tests check this byte for byte against datagrams captured from a
  real OpenSIPS (``tests/vectors/opensips/wire.json``).
* **Strict input.** ``msgspec`` would happily encode ``bytes`` (as base64),
  sets, dates or NaN (as ``null``). None of that is a JSON value the event
  model knows, so anything but str / int / finite float / bool / None and
  nested lists, tuples and str-keyed mappings is rejected with a
  :class:`WireError` that names where it is (``params['a'][2]``).
* **Never truncate.** A payload over ``limit`` (default :data:`MAX_PAYLOAD`, the
  figure OpenSIPS documents but never enforces) raises :class:`PayloadTooLarge`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal

import msgspec

from engine.errors import BadEventName, PayloadTooLarge, WireError

__all__ = [
    "EVENT_NAME_RULE",
    "MAX_PAYLOAD",
    "BadEventName",
    "EventName",
    "Params",
    "PayloadTooLarge",
    "WireError",
    "check_event_name",
    "encode_notification",
]

MAX_PAYLOAD: Final = 65457
"""Largest payload accepted, in bytes (OpenSIPS's documented maximum)."""

Params = Mapping[str, Any] | Sequence[Any] | None
"""Named params (a mapping, sent as a JSON object), positional (a sequence, sent
as a JSON array), or None for no params."""


EVENT_NAME_RULE: Final = "1-255 printable ASCII characters, no spaces"
_EVENT_NAME_PATTERN: Final = r"\A[!-~]{1,255}\Z"  # \Z: no trailing newline either
_EVENT_NAME_RE: Final = re.compile(_EVENT_NAME_PATTERN)

EventName = Annotated[str, msgspec.Meta(pattern=_EVENT_NAME_PATTERN)]
"""An event name as msgspec checks it while decoding (the state file, the config)."""


def check_event_name(name: object) -> str:
    """Return `name` if it follows EVENT_NAME_RULE (the one rule for every event
    name: the API, the config, the state file, received notifications), else
    raise BadEventName naming it."""
    if not isinstance(name, str) or not _EVENT_NAME_RE.match(name):
        raise BadEventName(f"event name {name!r}: expected {EVENT_NAME_RULE}")
    return name


class _Notification(msgspec.Struct, omit_defaults=True, gc=False):
    # Field order is wire order. ``params`` is left out while UNSET.
    jsonrpc: str
    method: str
    params: Any = msgspec.UNSET


_encode: Final = msgspec.json.Encoder().encode
# Exact types whose msgspec encoding needs no further check (float needs one).
_SCALARS: Final = frozenset({str, int, bool, type(None)})
# Sequences that are not JSON arrays.
_NOT_ARRAYS: Final = (str, bytes, bytearray, memoryview)


def encode_notification(method: str, params: Params = None, *, limit: int = MAX_PAYLOAD) -> bytes:
    """Return the JSON-RPC 2.0 notification for one event, as sent on the wire.

    ``params``: a mapping with str keys (JSON object, in iteration order; an
    empty one gives ``"params":{}``), a list/tuple or other non-text sequence
    (JSON array; an empty one gives no ``params`` key, as OpenSIPS does), or
    None (no ``params`` key). Raises :class:`WireError` for input that is not
    JSON as described in the module docstring, :class:`PayloadTooLarge` when
    the payload is longer than ``limit`` bytes.
    """
    if type(method) is not str:
        if not isinstance(method, str):
            raise WireError("method: must be a non-empty string")
        method = str.__str__(method)  # a StrEnum member, say: send its value
    if not method:
        raise WireError("method: must be a non-empty string")
    try:
        if params is None:
            payload = _encode(_Notification("2.0", method))
        else:
            if not _is_plain(params):
                params = _normalize_params(params)
            if type(params) is dict or params:
                payload = _encode(_Notification("2.0", method, params))
            else:  # empty array: OpenSIPS leaves params out
                payload = _encode(_Notification("2.0", method))
    except UnicodeEncodeError:
        raise _surrogate_error(method, params) from None
    except RecursionError:
        raise WireError("params: nested too deeply (or contains itself)") from None
    if len(payload) > limit:
        raise PayloadTooLarge(method, len(payload), limit)
    return payload


def _is_plain(params: object) -> bool:
    """Fast path: True if ``params`` is a dict/list/tuple that msgspec encodes as is.

    Exact types only (subclasses take the slow path); lone surrogates are
    caught by the encoder itself.
    """
    if type(params) is dict:
        for key, value in params.items():
            if type(key) is not str:
                return False
            if type(value) not in _SCALARS and not _is_plain_other(value):
                return False
        return True
    if type(params) is list or type(params) is tuple:
        for value in params:
            if type(value) not in _SCALARS and not _is_plain_other(value):
                return False
        return True
    return False


def _is_plain_other(value: object) -> bool:
    # A value that is not in _SCALARS: a finite float or a plain container.
    if type(value) is float:
        return math.isfinite(value)
    return _is_plain(value)


def _normalize_params(params: object) -> dict[str, Any] | list[Any]:
    """Slow path: check ``params`` fully and return it built from exact JSON types.

    Raises WireError naming the first offending part.
    """
    if isinstance(params, Mapping):
        return _normalize_object(params, "params")
    if isinstance(params, Sequence) and not isinstance(params, _NOT_ARRAYS):
        return _normalize_array(params, "params")
    raise WireError(
        f"params: {type(params).__name__} is not valid params "
        "(expected a mapping, a list/tuple, or None)"
    )


def _normalize_object(obj: Mapping[Any, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WireError(f"{path}: key {key!r} is not a string")
        out[str.__str__(key)] = _normalize_value(value, f"{path}[{key!r}]")
    return out


def _normalize_array(seq: Sequence[Any], path: str) -> list[Any]:
    return [_normalize_value(value, f"{path}[{i}]") for i, value in enumerate(seq)]


def _normalize_value(value: object, path: str) -> Any:
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # bool handled above; IntEnum and friends -> plain int
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WireError(f"{path}: float {value!r} is not valid JSON")
        return float(value)
    if isinstance(value, Mapping):
        return _normalize_object(value, path)
    if isinstance(value, Sequence) and not isinstance(value, _NOT_ARRAYS):
        return _normalize_array(value, path)
    raise WireError(f"{path}: {type(value).__name__} is not a JSON value")


def _surrogate_error(method: str, params: object) -> WireError:
    """Build the error for a string the encoder refused (lone surrogate)."""
    found = _find_surrogate(method, "method")
    if found is None and params is not None:
        found = _find_surrogate(params, "params")
    return WireError(found or "params: a string is not valid UTF-8")


def _find_surrogate(value: object, path: str) -> str | None:
    if isinstance(value, str):
        return _check_text(value, path, "string")
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _check_text(key, path, f"key {key!r}") or _find_surrogate(
                item, f"{path}[{key!r}]"
            )
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _find_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _check_text(text: str, path: str, what: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        return f"{path}: {what} is not valid UTF-8 (lone surrogate {bad!r} at index {exc.start})"
    return None


# -- received notifications (datagram ingest, the broker) ---------------------------------

REJECT_REASONS: Final = ("malformed", "unknown_event", "oversize", "source_not_allowed")
"""Why a received notification is not forwarded (SPEC section 8)."""


class NotificationRejected(WireError):
    """A received notification that is not forwarded; `reason` is one of
    REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Received(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    # Validated, never built: `params` stays raw bytes (its JSON is still checked).
    # `method` is not matched against the event-name rule here (a regex would
    # double the cost): a known event passed it when it was registered.
    jsonrpc: Literal["2.0"]
    method: str
    params: msgspec.Raw = msgspec.Raw(b"")


_decode_received: Final = msgspec.json.Decoder(_Received).decode
_OPENERS: Final = frozenset(b"{[")


def check_notification(data: bytes, *, limit: int = MAX_PAYLOAD) -> str:
    """Validate one received notification as SPEC section 8 says; return its method.

    A JSON object with `"jsonrpc":"2.0"`, a string `method`, optional `params`
    (an object or an array), no `id`, nothing else and no key twice; valid UTF-8
    throughout; at most `limit` bytes. The bytes are forwarded as they are, so
    nothing is re-encoded. Raises NotificationRejected ("oversize" or "malformed").
    Whether `method` names a known event is the caller's check (a name to register
    must pass check_event_name first). Keys inside `params` are not checked.
    """
    size = len(data)
    if size > limit:
        raise NotificationRejected("oversize", f"{size} bytes, over the {limit}-byte limit")
    try:
        received = _decode_received(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise NotificationRejected("malformed", str(exc)) from None
    params = received.params
    params_size = len(params)
    if params_size and memoryview(params)[0] not in _OPENERS:  # Raw: no leading space
        raise NotificationRejected("malformed", "params: expected an object or an array")
    if not data.isascii():
        try:
            data.decode("utf-8")  # msgspec checks UTF-8 only in what it builds
        except UnicodeDecodeError as exc:
            raise NotificationRejected("malformed", f"invalid UTF-8 at byte {exc.start}") from None
    method = received.method
    # A key given twice: msgspec keeps the last, OpenSIPS's cJSON the first, and the
    # bytes are forwarded as they are, so a subscriber could read another event than
    # the one routed. What the members written once take, compactly, is known from
    # the values msgspec kept (OpenSIPS's form: all of it); a repeat adds at least
    # _REPEAT_MIN bytes, so fewer extra (a little whitespace, as json.dumps puts)
    # prove there is none. `len(method)` counts characters, never more than its
    # JSON's bytes, so the extra is never underestimated.
    if size - len(method) - params_size >= (_SLOW_WITH if params_size else _SLOW_WITHOUT):
        key = _duplicate_key(data, params)
        if key is not None:
            raise NotificationRejected("malformed", f"key {key!r} given twice")
    return method


_COMPACT_SIZE: Final = len(b'{"jsonrpc":"2.0","method":""}')  # and the method's characters
_PARAMS_MEMBER: Final = len(b',"params":')  # and the params' JSON
# The shortest repeat msgspec takes: params keeps any JSON value (jsonrpc only "2.0",
# method a string), so `,"params":0` (11 bytes).
_REPEAT_MIN: Final = len(b',"params":0')
# Sizes from which the slow path runs, less the method's characters and the params'.
_SLOW_WITHOUT: Final = _COMPACT_SIZE + _REPEAT_MIN
_SLOW_WITH: Final = _COMPACT_SIZE + _PARAMS_MEMBER + _REPEAT_MIN
_JSON_SPACE: Final = " \t\n\r"


def _duplicate_key(data: bytes, params: msgspec.Raw) -> str | None:
    """check_notification's slow path (not OpenSIPS's compact form): the first
    top-level key of `data` given twice, else None.

    `data` is a notification msgspec took, `params` the value it kept (the last).
    Only the top level is walked: keys and string values by the json module's C
    scanner, and an object or array value only if it is `params` itself (one
    comparison; any other is not the last of its key, so that key comes again).
    So the cost is about one pass over the bytes, never a parse of params.
    """
    text = data.decode("utf-8")
    kept = bytes(params).decode("utf-8")
    seen: set[str] = set()
    pos = text.index("{") + 1
    while True:  # a member per round: each moves pos forward, to the closing brace
        while text[pos] in _JSON_SPACE:
            pos += 1
        key, pos = _scanstring(text, pos + 1)  # msgspec took it: a key is next
        if key in seen:
            return key
        seen.add(key)
        pos = text.index(":", pos) + 1
        while text[pos] in _JSON_SPACE:
            pos += 1
        opener = text[pos]
        if opener == '"':
            _, pos = _scanstring(text, pos + 1)
        elif key == "params" and opener in "{[" and text.startswith(kept, pos):
            pos += len(kept)
        else:
            return key  # not the value msgspec kept: the key comes again later
        while text[pos] in _JSON_SPACE:
            pos += 1
        if text[pos] == "}":
            return None
        pos += 1  # the comma


# (text, index just after the opening quote) -> (the string, index after its end); C
_scanstring: Final[Callable[[str, int], tuple[str, int]]] = json.decoder.scanstring  # type: ignore[attr-defined]


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)


def repeated_key(doc: bytes | str) -> str | None:
    """The first key given twice in any object of JSON document `doc` (innermost
    objects first), else None. For a document msgspec has already decoded: one more
    parse, by the json module, that only looks at keys. Raises WireError when that
    parse fails (nested deeper than Python's recursion limit, say)."""
    try:
        json.loads(doc, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as exc:
        return exc.key
    except RecursionError:
        raise WireError("nested too deeply") from None
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    return None
