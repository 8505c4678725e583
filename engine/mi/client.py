"""A small MI client: send one JSON-RPC request to a running engine, get the result.

Targets: ``http://HOST:PORT/mi`` (the default, http://127.0.0.1:8558/mi),
``udp:HOST:PORT`` (the MI datagram socket) or ``fifo:PATH`` (the MI FIFO;
the reply FIFO is created in /tmp, or in ``reply_dir``). The same client works
against a real OpenSIPS.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Final

import msgspec

from engine.address import parse_listen
from engine.errors import MIClientError, MIReplyError

DEFAULT_TARGET: Final = "http://127.0.0.1:8558/mi"
_ids = itertools.count(1)


def call(
    target: str,
    method: str,
    params: list[Any] | dict[str, Any] | None = None,
    *,
    timeout: float = 5.0,
    reply_dir: str = "/tmp",
) -> Any:
    """Run ``method`` on the MI at ``target``; return its result or raise."""
    request_id = next(_ids)
    request = msgspec.json.encode(
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or []}
    )
    if target.startswith(("http://", "https://")):
        raw = _http(target, request, timeout)
    elif target.startswith("udp:"):
        raw = _udp(target, request, request_id, timeout)
    elif target.startswith("fifo:"):
        raw = _fifo(target[5:], request, timeout, reply_dir)
    else:
        raise MIClientError(
            f"MI target {target!r}: expected http://..., udp:HOST:PORT or fifo:PATH"
        )
    return parse_reply(raw, target)


def parse_reply(raw: bytes, target: str = "the MI") -> Any:
    try:
        reply = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise MIClientError(f"{target} answered with non-JSON: {raw[:200]!r}") from None
    if not isinstance(reply, dict):
        raise MIClientError(f"{target} answered with a JSON value that is not a reply")
    error = reply.get("error")
    if isinstance(error, dict):
        raise MIReplyError(error.get("code"), error.get("message"), error.get("data"))
    if "result" not in reply:
        raise MIClientError(f"{target} answered without a result: {raw[:200]!r}")
    return reply["result"]


def _http(url: str, request: bytes, timeout: float) -> bytes:
    req = urllib.request.Request(url, request, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        body = exc.read()
        if body.startswith(b"{"):
            return body  # a JSON-RPC error sent with an HTTP error status (413, ...)
        raise MIClientError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MIClientError(f"cannot reach the MI at {url}: {reason}") from None


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
                    if isinstance(reply, dict) and reply.get("id") != request_id:
                        continue  # a late reply to an earlier request
                return data
        except TimeoutError:
            raise MIClientError(f"no answer from the MI at {target} in {timeout:g} s") from None
        except OSError as exc:
            raise MIClientError(f"cannot reach the MI at {target}: {exc.strerror}") from None


def _fifo(path: str, request: bytes, timeout: float, reply_dir: str) -> bytes:
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
            return _read_reply(rfd, path, timeout)
        finally:
            os.close(rfd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(reply_path)


def _read_reply(fd: int, path: str, timeout: float) -> bytes:
    """Read until the server closes the reply FIFO (Linux: no EOF before a writer came)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MIClientError(f"no answer from the MI FIFO {path} in {timeout:g} s")
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
        chunks.append(chunk)
