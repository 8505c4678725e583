"""The MI transports: HTTP (``POST /mi``, ``GET /metrics``) and a UDP datagram socket.

Both only parse bytes and call :func:`engine.mi.handle`; they run on their own
threads, never on the producer's raise path (an MI ``raise_event`` takes the
engine lock only for the moment it queues the event).

Hardening, all with clear JSON-RPC errors and the server still serving:

* HTTP: a body over ``max_body`` bytes is refused with 413 (not read); a
  missing length with 411; chunked bodies with 501. Each connection gets a
  socket timeout (idle keep-alive connections are closed after it), and a
  request that is still not complete ``request_deadline`` seconds after it
  started is cut off, so a slow client cannot hold a thread. At most
  ``max_connections`` connections are served at once; beyond that a client
  gets an immediate 503.
* Datagram: requests up to 65535 bytes; a reply too big for one datagram is
  replaced by a -32000 error telling the client to use HTTP.
* The MI FIFO (engine/mi_fifo.py) has its own limits.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final

from engine.address import format_listen
from engine.mi.protocol import error_reply, handle

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.server")

MAX_BODY: Final = 1 << 20
MAX_DATAGRAM: Final = 65535
MAX_UDP_REPLY: Final = 65507  # the largest IPv4 UDP payload
JSON: Final = "application/json"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- HTTP -----------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        engine: Engine,
        *,
        max_body: int,
        timeout: float,
        request_deadline: float,
        max_connections: int,
        per_subscriber: bool,
    ) -> None:
        self.address_family = _family(address[0])
        self.engine = engine
        self.per_subscriber = per_subscriber
        self.max_body = max_body
        self.conn_timeout = timeout
        self.request_deadline = request_deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        super().__init__(address, _MIHandler)

    # One thread per connection, but never more than max_connections of them.
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.set_deadline(request, None)
            self._slots.release()

    def set_deadline(self, conn: socket.socket, deadline: float | None) -> None:
        with self._deadlines_lock:
            if deadline is None:
                self._deadlines.pop(conn, None)
            else:
                self._deadlines[conn] = deadline

    def service_actions(self) -> None:
        """Called by serve_forever every poll interval: cut off overdue requests."""
        now = time.monotonic()
        with self._deadlines_lock:
            overdue = [c for c, d in self._deadlines.items() if d <= now]
            for conn in overdue:
                del self._deadlines[conn]
        for conn in overdue:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _MIHandler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "event-datagram"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.conn_timeout)
        # Headers and body are two writes: without this, Nagle + delayed ACK add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        # Idle time before the request plus the time to read and answer it.
        limit = self.server.conn_timeout + self.server.request_deadline
        self.server.set_deadline(self.connection, time.monotonic() + limit)
        try:
            super().handle_one_request()
        except OSError:  # timeouts, resets, a request cut off by its deadline
            self.close_connection = True
        finally:
            self.server.set_deadline(self.connection, None)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str = JSON) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, status: int, why: str) -> None:
        """Answer with a JSON-RPC -32600 error and drop the connection (body unread)."""
        self.close_connection = True
        self._send(status, error_reply(-32600, "Invalid Request", why))

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/mi":
            self.close_connection = True
            self._send(404, b"not found: the MI is at POST /mi\n", "text/plain")
            return
        if self.headers.get("Transfer-Encoding"):
            self._refuse(501, "chunked request bodies are not supported; send Content-Length")
            return
        lengths = self.headers.get_all("Content-Length") or []
        if len(set(lengths)) > 1:  # which one frames the body? (request smuggling)
            self._refuse(400, "conflicting Content-Length headers")
            return
        length_text = lengths[0] if lengths else None
        if length_text is None:
            self._refuse(411, "Content-Length is required")
            return
        length = int(length_text) if length_text.isdigit() and len(length_text) < 19 else -1
        if length < 0:
            self._refuse(400, f"bad Content-Length {length_text[:40]!r}")
            return
        limit = self.server.max_body
        if length > limit:
            self._refuse(413, f"request body is {length} bytes, over the {limit}-byte limit")
            return
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away
            self.close_connection = True
            return
        reply = handle(self.server.engine, body)
        if reply is None:  # a notification: nothing to say
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(200, reply)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/mi":
            self.close_connection = True
            self._send(405, b"the MI takes JSON-RPC requests by POST\n", "text/plain")
        else:
            self.close_connection = True
            self._send(404, b"not found: try POST /mi or GET /metrics\n", "text/plain")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _metrics(self) -> None:
        try:
            metrics = importlib.import_module("engine.metrics")
        except ModuleNotFoundError as exc:
            if exc.name != "engine.metrics":
                raise
            self._send(503, b"metrics are not available: engine.metrics is missing\n", "text/plain")
            return
        try:
            body, content_type = metrics.exposition(
                self.server.engine,
                per_subscriber=self.server.per_subscriber,
                accept=self.headers.get("Accept"),
            )
        except Exception as exc:
            log.exception("metrics exposition failed")
            self._send(500, f"metrics exposition failed: {exc}\n".encode(), "text/plain")
            return
        self._send(200, body, content_type)


class HTTPServer:
    """``POST /mi`` and ``GET /metrics`` on one address, served by a thread.

    ``per_subscriber`` is passed to engine.metrics.exposition (config
    ``[metrics] per_subscriber``), with the request's Accept header.
    """

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        *,
        max_body: int = MAX_BODY,
        timeout: float = 5.0,
        request_deadline: float = 10.0,
        max_connections: int = 64,
        per_subscriber: bool = False,
    ) -> None:
        self._server = _HTTPServer(
            address,
            engine,
            max_body=max_body,
            timeout=timeout,
            request_deadline=request_deadline,
            max_connections=max_connections,
            per_subscriber=per_subscriber,
        )
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.25,), name="edg-mi-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; also for a server never started
        (shutdown() would wait forever for a serve_forever that never ran)."""
        if self._thread.ident is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://{format_listen(self.address)}/mi"


# -- UDP datagram ---------------------------------------------------------------------------


class DatagramServer:
    """MI over UDP, like OpenSIPS mi_datagram: one request per datagram, the
    reply sent back to the sender's address."""

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        *,
        handler: Callable[[Engine, bytes], bytes | None] = handle,
    ) -> None:
        self._engine = engine
        self._handler = handler
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
            if len(data) > MAX_DATAGRAM:
                why = f"request is over the {MAX_DATAGRAM}-byte datagram limit"
                reply: bytes | None = error_reply(-32600, "Invalid Request", why)
            else:
                reply = self._handler(self._engine, data)
            if reply is not None:
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
