"""``event-datagram listen``: bind a socket, subscribe it, print what arrives.

The socket is ``udp:IP:PORT`` (port 0 picks a free one) or ``unix:/PATH`` /
``/PATH``. Each event is subscribed with ``expire`` seconds and refreshed at
half of that, so the subscription never lapses while the listener runs. On
SIGINT/SIGTERM every subscription is removed (expire 0) and a UNIX socket file
is deleted. Each datagram is printed on its own line, byte for byte as it
arrived (JSON-RPC notifications never contain a raw newline), or with
``--json`` as ``{"received":..,"size":..,"datagram":..}`` per line.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import sys
import time
from typing import Any, BinaryIO

import msgspec

from engine.address import format_listen, parse_listen
from engine.cli.explain import explain
from engine.errors import ListenError, MIClientError, MIReplyError
from engine.mi.client import call
from engine.mi.http_client import ClientAuth
from engine.signals import SignalCatcher


def bind(text: str) -> tuple[socket.socket, str]:
    """Bind the socket named by ``text``; return it and its subscriber socket string."""
    if text.startswith("udp:"):
        try:
            address = parse_listen(text[4:], "socket")
        except ValueError as exc:
            raise ListenError(str(exc)) from None
        if address is None:
            raise ListenError(f"socket {text!r}: expected udp:IP:PORT")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot bind {text}: {exc.strerror}") from None
        return sock, "udp:" + format_listen(sock.getsockname()[:2])
    path = text.removeprefix("unix:")
    if not path.startswith("/"):
        raise ListenError(f"socket {text!r}: expected udp:IP:PORT, unix:/PATH or /PATH")
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot bind {path}: {exc.strerror}") from None
    return sock, f"unix:{path}"


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on any more; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale
        return
    except OSError:
        return
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by another listener")


def run_listener(
    target: str,
    socket_text: str,
    events: list[str],
    expire: int,
    as_json: bool,
    timeout: float = 5.0,
    out: BinaryIO | None = None,
    filters: list[str] | None = None,
    auth: ClientAuth | None = None,
) -> int:
    out = out if out is not None else sys.stdout.buffer
    sock, me = bind(socket_text)
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    caught = SignalCatcher((signal.SIGINT, signal.SIGTERM)).__enter__()  # left in finally
    subscribed: list[str] = []
    status = 0
    try:
        for event in events:
            call(
                target,
                "event_subscribe",
                _params(event, me, expire, filters),
                timeout=timeout,
                auth=auth,
            )
            subscribed.append(event)
        print(
            f"listening on {me} for {', '.join(events)} (expire {expire} s)",
            file=sys.stderr,
            flush=True,
        )
        refresh_every = max(0.5, expire / 2)
        next_refresh = time.monotonic() + refresh_every
        while caught.received is None:
            wait = max(0.0, min(0.2, next_refresh - time.monotonic()))
            ready, _, _ = select.select([sock], [], [], wait)
            if ready:
                _drain(sock, out, as_json)
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + refresh_every
                _refresh(target, me, subscribed, expire, timeout, auth, filters)
    except MIReplyError as exc:
        if len(subscribed) < len(events):  # refused while subscribing: say why
            params: list[object] = [events[len(subscribed)], me, expire]
            why = explain(target, "event_subscribe", params, exc, timeout, auth)
        else:
            why = str(exc)
        print(f"event-datagram listen: {why}", file=sys.stderr)
        status = 1
    except MIClientError as exc:
        print(f"event-datagram listen: {exc}", file=sys.stderr)
        status = 1
    except BrokenPipeError:  # the reader of our output went away: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        caught.__exit__(None, None, None)
        for event in subscribed:
            try:
                call(
                    target,
                    "event_subscribe",
                    _params(event, me, 0, filters),
                    timeout=timeout,
                    auth=auth,
                )
            except (MIReplyError, MIClientError) as exc:
                print(f"event-datagram listen: unsubscribe {event}: {exc}", file=sys.stderr)
                status = 1
        sock.close()
        if me.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(me[5:])
    return status


def _params(event: str, me: str, expire: int, filters: list[str] | None) -> Any:
    """OpenSIPS's positional params, or named ones with our `filter` (docs/routing.md)."""
    if not filters:
        return [event, me, expire]
    return {"event": event, "socket": me, "expire": expire, "filter": filters}


def _refresh(
    target: str,
    me: str,
    events: list[str],
    expire: int,
    timeout: float,
    auth: ClientAuth | None,
    filters: list[str] | None = None,
) -> None:
    for event in events:
        try:
            call(
                target,
                "event_subscribe",
                _params(event, me, expire, filters),
                timeout=timeout,
                auth=auth,
            )
        except (MIReplyError, MIClientError) as exc:  # keep listening; retry next time
            print(f"event-datagram listen: refresh {event}: {exc}", file=sys.stderr, flush=True)


def _drain(sock: socket.socket, out: BinaryIO, as_json: bool) -> None:
    while True:
        try:
            data = sock.recv(1 << 17)
        except BlockingIOError:
            break
        if as_json:
            try:
                datagram: object = msgspec.json.decode(data)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                datagram = data.decode("utf-8", "replace")
            line = {"received": round(time.time(), 6), "size": len(data), "datagram": datagram}
            out.write(msgspec.json.encode(line) + b"\n")
        else:
            out.write(data + b"\n")
        out.flush()
