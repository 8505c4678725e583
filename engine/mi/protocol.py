"""The OpenSIPS management interface (MI): JSON-RPC 2.0 dispatch, transport-free.

``handle(engine, request_bytes)`` takes one request exactly as a transport
received it and returns the reply bytes, or None when no reply is due (a
notification: a request without ``id``). Every transport (HTTP, UDP datagram,
FIFO; engine/server.py, engine/mi_fifo.py) calls it and nothing else.

Replies are built the way OpenSIPS prints them (cJSON, unformatted): keys
``jsonrpc``, ``result`` | ``error``, ``id`` in that order, no spaces, the
``id`` echoed byte for byte as the request gave it (so its JSON type is kept).
The request checks follow OpenSIPS's ``parse_mi_request`` and
``handle_mi_request`` (mi/mi.c): malformed JSON -> -32700, not a valid
JSON-RPC request -> -32600 (both also answered when there is no ``id``, with
``"id":null``), unknown method -> -32601, params that match none of the
command's recipes -> -32602 with OpenSIPS's ``data`` text; ``params`` that is
an empty array or object counts as no params.

The commands themselves live in engine/mi_commands.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from engine.errors import BadRequest, MIError
from engine.mi.commands import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    run,
)

if TYPE_CHECKING:
    from engine.producer import Engine

__all__ = [
    "BadRequest",
    "MIError",
    "Request",
    "error_reply",
    "handle",
    "parse_request",
    "result_reply",
]

log = logging.getLogger("event_datagram.mi")

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


def handle(engine: Engine, data: bytes) -> bytes | None:
    """Run one MI request against ``engine``; return the reply, or None for none.

    Never raises: anything unexpected becomes a -32000 "Server error" reply
    (and is logged), so a transport can always keep serving.
    """
    try:
        request = parse_request(data)
    except BadRequest as bad:
        return error_reply(bad.code, bad.message, bad.data, bad.id_json)
    except Exception:  # pragma: no cover - a bug; keep the transport alive
        log.exception("MI request could not be parsed")
        return error_reply(SERVER_ERROR, "Server error")
    reply_id = _NULL if request.id is None else request.id
    try:
        reply = result_reply(run(engine, request.method, request.params), reply_id)
    except MIError as err:
        reply = error_reply(err.code, err.message, err.data, reply_id)
    except RecursionError:
        reply = error_reply(INVALID_PARAMS, "Invalid params", "nested too deeply", reply_id)
    except Exception as exc:
        log.exception("MI command %r failed", request.method)
        reply = error_reply(SERVER_ERROR, "Server error", type(exc).__name__, reply_id)
    return None if request.id is None else reply
