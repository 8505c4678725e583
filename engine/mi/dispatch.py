"""One MI request run end to end: parse it (protocol.py), run its command
(commands.py), reply (protocol.py).

``handle(engine, request_bytes)`` takes one request exactly as a transport
received it and returns the reply bytes, or None when no reply is due (a
notification: a request without ``id``). Every transport (HTTP, UDP datagram,
FIFO: server.py, datagram.py, fifo.py) calls it and nothing else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from engine.errors import BadRequest, MIError
from engine.mi.commands import run
from engine.mi.protocol import (
    INVALID_PARAMS,
    SERVER_ERROR,
    error_reply,
    parse_request,
    result_reply,
)

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.mi")
_NULL: Final = b"null"  # the id a reply carries when the request had none


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
