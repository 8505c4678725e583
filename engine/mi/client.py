"""A small MI client: send one JSON-RPC request to a running engine, get the result.

Targets: ``http://HOST:PORT/mi`` (the default, http://127.0.0.1:8558/mi),
``udp:HOST:PORT`` (the MI datagram socket) or ``fifo:PATH`` (the MI FIFO;
the reply FIFO is created in /tmp, or in ``reply_dir``). The same client works
against a real OpenSIPS, and against a broken or hostile one: every call has one
deadline for all of it and a reply-size limit, and every failure is an
MIClientError whose ``reason`` says which kind (the upstream counts by it).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import time
from typing import Any, Final

import msgspec

from engine.address import parse_listen
from engine.errors import MIClientError, MIReplyError
from engine.mi.http_client import ClientAuth, http_post

DEFAULT_TARGET: Final = "http://127.0.0.1:8558/mi"
MAX_REPLY: Final = 64 << 20  # bytes; the CLI's limit (an upstream sets its own, smaller)
ERROR_REASONS: Final = ("unreachable", "timeout", "bad_reply", "too_large")
BAD: Final = "bad_reply"
_ids = itertools.count(1)


def call(
    target: str,
    method: str,
    params: list[Any] | dict[str, Any] | None = None,
    *,
    timeout: float = 5.0,
    reply_dir: str = "/tmp",
    max_reply: int = MAX_REPLY,
    auth: ClientAuth | None = None,
) -> Any:
    """Run ``method`` on the MI at ``target``; return its result or raise.

    ``timeout`` is the whole call's deadline (connecting, sending and every read
    together: a reply trickled a byte at a time fails at it); a reply of more than
    ``max_reply`` bytes is refused without being read whole. Raises MIReplyError
    (the MI answered an error) or MIClientError, whose ``reason`` is one of
    ERROR_REASONS. ``auth`` (http:// and https:// targets): the CA to trust, a
    client certificate and basic-auth credentials."""
    request_id = next(_ids)
    request = msgspec.json.encode(
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or []}
    )
    deadline = time.monotonic() + timeout
    if target.startswith(("http://", "https://")):
        raw = http_post(target, request, deadline, max_reply, auth)
    elif target.startswith("udp:"):
        raw = _udp(target, request, request_id, timeout)
    elif target.startswith("fifo:"):
        raw = _fifo(target[5:], request, timeout, reply_dir, max_reply)
    else:
        raise MIClientError(
            f"MI target {target!r}: expected http://..., udp:HOST:PORT or fifo:PATH"
        )
    if len(raw) > max_reply:
        raise _too_large(target, max_reply)
    return parse_reply(raw, target)


def parse_reply(raw: bytes, target: str = "the MI") -> Any:
    try:
        reply = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep
        raise MIClientError(f"{target} answered with non-JSON: {raw[:200]!r}", BAD) from None
    if not isinstance(reply, dict):
        raise MIClientError(f"{target} answered with a JSON value that is not a reply", BAD)
    error = reply.get("error")
    if isinstance(error, dict):
        raise MIReplyError(error.get("code"), error.get("message"), error.get("data"))
    if "result" not in reply:
        raise MIClientError(f"{target} answered without a result: {raw[:200]!r}", BAD)
    return reply["result"]


def _too_large(target: str, limit: int) -> MIClientError:
    return MIClientError(f"{target} answered more than {limit} bytes", "too_large")


def _udp(target: str, request: bytes, request_id: int, timeout: float) -> bytes:
    try:
        address = parse_listen(target[4:], "MI datagram address")
    except ValueError as exc:
        raise MIClientError(str(exc)) from None
    if address is None:
        raise MIClientError(f"MI target {target!r}: no address")
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.send(request)
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(65536)
                with contextlib.suppress(msgspec.DecodeError, RecursionError):
                    reply = msgspec.json.decode(data)
                    rid = reply.get("id") if isinstance(reply, dict) else None
                    if rid is not None and rid != request_id:
                        continue  # a late reply to an earlier request (the deadline ends it)
                return data
        except TimeoutError:
            raise MIClientError(
                f"no answer from the MI at {target} in {timeout:g} s", "timeout"
            ) from None
        except OSError as exc:
            raise MIClientError(f"cannot reach the MI at {target}: {exc.strerror}") from None


def _fifo(path: str, request: bytes, timeout: float, reply_dir: str, max_reply: int) -> bytes:
    name = f"event_datagram_reply_{os.getpid()}_{next(_ids)}"
    reply_path = os.path.join(reply_dir, name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(reply_path)
    os.mkfifo(reply_path, 0o600)
    try:
        # Open our end first (non-blocking): the server can then open it at once.
        rfd = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            try:
                wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                why = "nobody serves it" if exc.errno == errno.ENXIO else exc.strerror
                raise MIClientError(f"cannot reach the MI FIFO {path}: {why}") from None
            try:
                os.write(wfd, b":" + name.encode() + b":" + request + b"\n")
            finally:
                os.close(wfd)
            return _read_reply(rfd, path, timeout, max_reply)
        finally:
            os.close(rfd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(reply_path)


def _read_reply(fd: int, path: str, timeout: float, max_reply: int) -> bytes:
    """Read until the server closes the reply FIFO (Linux: no EOF before a writer came),
    by the deadline and up to max_reply bytes."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MIClientError(f"no answer from the MI FIFO {path} in {timeout:g} s", "timeout")
        poller = select.poll()  # not select(): the fd may be past 1023 in a busy process
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(1, int(left * 1000))):
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_reply:
            raise _too_large(f"the MI FIFO {path}", max_reply)
        chunks.append(chunk)
