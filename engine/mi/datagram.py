"""MI over UDP, as OpenSIPS mi_datagram: one JSON-RPC request per datagram.

Requests up to 65535 bytes; a reply too big for one datagram is replaced by a
-32000 error telling the client to use HTTP. Who is answered at all is
engine/mi/datagram_guard.py's decision (never a reflector). Runs on its own
thread, never on the producer's raise path.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from engine.address import format_listen
from engine.mi.datagram_guard import DatagramGuard, parse_datagram_allow
from engine.mi.dispatch import handle
from engine.mi.protocol import error_reply

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.server")

MAX_DATAGRAM: Final = 65535
MAX_UDP_REPLY: Final = 65507  # the largest IPv4 UDP payload


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class DatagramServer:
    """MI over UDP, like OpenSIPS mi_datagram: one request per datagram, the
    reply sent back to the sender's address, never a reflector: what it answers
    is engine/mi/datagram_guard.py's decision (`allow`: source networks answered;
    None = loopback), its drops counted in ``engine.guards``."""

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        *,
        handler: Callable[[Engine, bytes], bytes | None] = handle,
        allow: list[str] | None = None,
    ) -> None:
        self._engine = engine
        self._handler = handler
        self.guard = DatagramGuard(
            parse_datagram_allow(allow or []), count=engine.guards.count_mi_datagram_dropped
        )
        self._sock = socket.socket(_family(address[0]), socket.SOCK_DGRAM)
        try:
            self._sock.bind(address)
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(0.25)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edg-mi-datagram", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            with contextlib.suppress(OSError):  # wake the receiver up
                self._sock.sendto(b"", self._sock.getsockname())
            self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("MI datagram receive failed: %s", exc)
                time.sleep(0.05)
                continue
            if self._stop.is_set():
                return
            if not self.guard.admit(data, sender[0]):
                continue
            if len(data) > MAX_DATAGRAM:
                why = f"request is over the {MAX_DATAGRAM}-byte datagram limit"
                reply: bytes | None = error_reply(-32600, "Invalid Request", why)
            else:
                reply = self._handler(self._engine, data)
            if reply is not None and self.guard.may_reply(reply, sender[0]):
                self._reply(reply, sender)

    def _reply(self, reply: bytes, sender: Any) -> None:
        if len(reply) > MAX_UDP_REPLY:
            why = f"the reply is {len(reply)} bytes, too big for one datagram; ask over HTTP"
            reply = error_reply(-32000, "Server error", why, _reply_id(reply))
        try:
            self._sock.sendto(reply, sender)
        except OSError as exc:
            log.debug("MI datagram reply to %s failed: %s", sender, exc)

    @property
    def url(self) -> str:
        return f"udp:{format_listen(self.address)}"


def _reply_id(reply: bytes) -> bytes:
    """The id of a reply built by engine.mi.protocol (it is always the last member)."""
    start = reply.rfind(b',"id":')
    return reply[start + 6 : -1] if start >= 0 else b"null"
