"""The OpenSIPS management interface's JSON-RPC 2.0 envelope, transport-free: the
error codes, ``parse_request`` (bytes in, a ``Request`` or a ``BadRequest``
out), and the replies (``result_reply``, ``error_reply``). It knows no command:
dispatch.py runs a parsed request against the commands (commands.py), which
raise ``MIError`` with the codes defined here.

Replies are built the way OpenSIPS prints them (cJSON, unformatted): keys
``jsonrpc``, ``result`` | ``error``, ``id`` in that order, no spaces, the
``id`` echoed byte for byte as the request gave it (so its JSON type is kept).
The request checks follow OpenSIPS's ``parse_mi_request`` and
``handle_mi_request`` (mi/mi.c): malformed JSON -> -32700, not a valid
JSON-RPC request -> -32600 (both also answered when there is no ``id``, with
``"id":null``), unknown method -> -32601, params that match none of the
command's recipes -> -32602 with OpenSIPS's ``data`` text; ``params`` that is
an empty array or object counts as no params.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from engine.errors import BadRequest, MIError

__all__ = [
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SERVER_ERROR",
    "BadRequest",
    "MIError",
    "Request",
    "error_reply",
    "parse_request",
    "result_reply",
]

# JSON-RPC 2.0's error codes, as OpenSIPS answers them.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
SERVER_ERROR: Final = -32000

_NULL: Final = b"null"
_decode_request: Final = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_any: Final = msgspec.json.Decoder().decode
_decode_str: Final = msgspec.json.Decoder(str).decode
_encode: Final = msgspec.json.Encoder().encode
# First byte of a valid id: a string, a number or null (OpenSIPS refuses the rest).
_ID_START: Final = frozenset(b'"-0123456789n')


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed JSON-RPC request."""

    id: bytes | None
    """The id's JSON text as received; None when absent (a notification)."""
    method: str
    params: list[Any] | dict[str, Any] | None
    """None when absent or empty (OpenSIPS: an empty params is no params)."""


def result_reply(result: object, id_json: bytes = _NULL) -> bytes:
    """``{"jsonrpc":"2.0","result":...,"id":...}``, compact, in OpenSIPS's key order."""
    return b'{"jsonrpc":"2.0","result":' + _encode(result) + b',"id":' + id_json + b"}"


def error_reply(code: int, message: str, data: str | None = None, id_json: bytes = _NULL) -> bytes:
    """``{"jsonrpc":"2.0","error":{"code":..,"message":..[,"data":..]},"id":...}``."""
    error: dict[str, object] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return b'{"jsonrpc":"2.0","error":' + _encode(error) + b',"id":' + id_json + b"}"


def parse_request(data: bytes) -> Request:
    """Check one request; raise BadRequest (code, message, data, id) when it is not valid."""
    try:
        with _parse_errors():
            # msgspec checks UTF-8 only in what it decodes to str, not inside Raw values.
            data.decode("utf-8")
            fields = _decode_request(data)
    except msgspec.ValidationError:  # valid JSON or not, but not an object
        with _parse_errors(validation_too=True):  # e.g. 1e999: "valid" but unreadable
            _decode_any(data)
        raise BadRequest(INVALID_REQUEST, "Invalid Request", "not a JSON object", _NULL) from None

    raw_id = fields.get("id")
    id_json: bytes | None = None
    if raw_id is not None:
        text = bytes(raw_id)
        if text[0] not in _ID_START:
            raise BadRequest(
                INVALID_REQUEST, "Invalid Request", "id must be a string, number or null", _NULL
            )
        id_json = text
    reply_id = _NULL if id_json is None else id_json

    def invalid(why: str) -> BadRequest:
        return BadRequest(INVALID_REQUEST, "Invalid Request", why, reply_id)

    if _string_field(fields, "jsonrpc") != "2.0":
        raise invalid('"jsonrpc" must be "2.0"')
    method = _string_field(fields, "method")
    if method is None:
        raise invalid('"method" must be a string')
    params: list[Any] | dict[str, Any] | None = None
    raw_params = fields.get("params")
    if raw_params is not None:
        try:
            value = _decode_any(raw_params)
        except RecursionError:
            raise invalid("params nested too deeply") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # e.g. 1e999
            why = str(exc).split(" - at ", 1)[0]
            raise BadRequest(PARSE_ERROR, "Parse error", why, reply_id) from None
        if not isinstance(value, list | dict):
            raise invalid('"params" must be an array or an object')
        params = value or None
    return Request(id_json, method, params)


@contextmanager
def _parse_errors(validation_too: bool = False) -> Iterator[None]:
    """Turn malformed JSON into the -32700 reply; a ValidationError (well-formed JSON
    of the wrong shape) passes through unless `validation_too`."""
    try:
        yield
    except msgspec.ValidationError:
        if not validation_too:
            raise
        raise BadRequest(PARSE_ERROR, "Parse error", None, _NULL) from None
    except msgspec.DecodeError:
        raise BadRequest(PARSE_ERROR, "Parse error", None, _NULL) from None
    except UnicodeDecodeError:
        raise BadRequest(PARSE_ERROR, "Parse error", "invalid UTF-8", _NULL) from None
    except RecursionError:
        raise BadRequest(PARSE_ERROR, "Parse error", "JSON nested too deeply", _NULL) from None


def _string_field(fields: dict[str, msgspec.Raw], name: str) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return _decode_str(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
