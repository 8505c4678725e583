"""The HTTP MI server (``POST /mi``, ``GET /metrics``): the event loop, connections, TLS.

Why this is long: one non-blocking loop owns every connection's state machine
(head, body, workers, reply, linger), its deadlines and its budgets; split, the
states would be shared across modules. Parsing is engine/mi/http.py's.

The UDP datagram server is engine/mi/datagram.py. Both only parse bytes and
call :func:`engine.mi.handle`; they run on their own
threads, never on the producer's raise path (an MI ``raise_event`` takes the
engine lock only for the moment it queues the event).

Hardening, all with clear JSON-RPC errors and the server still serving:

* HTTP: one event-loop thread owns every socket, non-blocking: it reads each
  request head and body into a per-connection buffer, hands a *complete*
  request to a small worker pool (the MI handler and the metrics exposition
  take the engine's locks, never on the loop thread), and writes the reply as
  the client reads it. A slow client therefore costs a buffer and a file
  descriptor, never a thread. Deadlines: a connection that has not sent a
  complete request head ``timeout`` seconds after it opened (or after its
  previous reply: the keep-alive idle time) is closed, and so is one whose body
  is not complete ``request_deadline`` seconds after its head, or that has not
  read its reply ``request_deadline`` seconds after it was ready. At most
  ``max_connections`` are open (bounded by the open-files limit, whose soft
  value is raised to the hard one when needed); a new connection beyond that
  closes the one that has been waiting longest for its client (reading a
  request, or writing a reply), and gets a 503 only when every connection has
  a request being answered. Bytes buffered for all the connections together
  are bounded the same way. A body over ``max_body`` bytes is refused with 413
  (not read); a missing length with 411; chunked bodies with 501; a head over
  64 KiB with 431.
* TLS and basic authentication (engine/mi/webconfig.py) and the browser checks
  (engine/mi/http.py): a TLS handshake is done on the loop, non-blocking, within
  the head deadline (a handshake that never finishes costs a buffer, and is
  closed, counted, when its deadline passes); the cheap checks run on the loop,
  a bcrypt check of a credential not seen before on a worker.
* The MI FIFO (engine/mi/fifo.py) has its own limits.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import queue
import re
import resource
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from engine.address import format_listen
from engine.mi import http as checks
from engine.mi import webconfig
from engine.mi.dispatch import handle
from engine.mi.protocol import error_reply

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.server")

MAX_BODY: Final = 1 << 20
JSON: Final = "application/json"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- HTTP -----------------------------------------------------------------------------------

TIMEOUT: Final = 5.0  # seconds for a complete request head (also the keep-alive idle time)
REQUEST_DEADLINE: Final = 10.0  # seconds for the body after its head, and for the reply
MAX_CONNECTIONS: Final = 4096
MAX_HEAD: Final = 65536  # request line and headers together
MI_WORKERS: Final = 4
METRICS_WORKERS: Final = 2  # scrapes never queue behind MI requests
BUFFER_BUDGET: Final = 64 << 20  # request and reply bytes held for all connections
FD_RESERVE: Final = 256  # descriptors left to the rest of the process
LINGER_S: Final = 1.0  # after a reply that closes: unread input is drained this long
LINGER_BYTES: Final = 1 << 20  # ... or up to this much, then the socket is closed
REFUSED_LINGERING: Final = 64  # refused (503) connections draining at once, beyond the limit
EVICT_DRAIN_READS: Final = 4  # reads (RECV_BYTES each) of an evicted connection's unread input
ACCEPT_BACKOFF_S: Final = 0.1  # accept() failed (out of descriptors): listen again after this
RECV_BYTES: Final = 65536
SERVER: Final = checks.SERVER

_SATURATED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: event-datagram\r\nContent-Length: 0\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_Request = checks.Request
_response = checks.response
_HEAD_END: Final = re.compile(rb"\n\r?\n")
_EMPTY: Final = memoryview(b"")
# A connection is in one state at a time: reading a head, reading a body, with the
# workers (its request being answered), writing its reply, or draining before a close.
_HEAD, _BODY, _BUSY, _WRITE, _LINGER = range(5)


def _descriptor_room(wanted: int) -> int:
    """How many connections the open-files limit leaves room for; its soft value is
    raised (up to the hard one) when it is short of `wanted` plus a reserve."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    need = wanted + FD_RESERVE
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (OSError, ValueError) as exc:
                log.warning("HTTP MI: cannot raise the open-files limit to %d: %s", target, exc)
    room = max(1, min(wanted, max(soft - FD_RESERVE, soft // 2)))
    if room < wanted:
        log.warning(
            "HTTP MI: the open-files limit (%d) leaves room for %d connections, not %d",
            soft,
            room,
            wanted,
        )
    return room


class _Conn:
    """One client connection: its socket, buffers, state and deadline."""

    __slots__ = (
        "close_after",
        "closed",
        "counted",
        "deadline",
        "drained",
        "eof",
        "events",
        "fd",
        "handshaking",
        "held",
        "inbuf",
        "line_end",
        "need",
        "out",
        "request",
        "scan",
        "sent",
        "sock",
        "state",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = _HEAD
        self.deadline = 0.0
        self.inbuf = bytearray()  # received, not yet parsed
        self.request: _Request | None = None  # the one being read or answered
        self.line_end = -1  # where the request line ends in inbuf (-1: not seen yet)
        self.scan = 0  # where to look on for the end of the request line, then of the head
        self.need = 0  # the body's length
        self.eof = False  # the client sent its FIN
        self.out = _EMPTY  # the reply being written
        self.sent = 0
        self.close_after = False
        self.drained = 0
        self.held = 0  # bytes counted in the server's buffer budget
        self.events = 0  # what the selector watches for
        self.closed = False
        self.counted = True  # in the connection limit (a refused one draining is not)
        self.handshaking = False  # a TLS handshake under way (the head deadline applies)


_Job = tuple[_Conn, _Request, bytes]


class _HTTPServer:
    """The event loop: every socket, non-blocking, on one thread; complete requests
    are answered by worker threads, their replies written back by the loop."""

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
        web: webconfig.WebConfig | None = None,
        policy: checks.RequestPolicy | None = None,
        serve_mi: bool = True,
        serve_metrics: bool = True,
        ready: Callable[[], list[str]] | None = None,
        security: checks.SecurityCounters | None = None,
        name: str = "mi",
    ) -> None:
        self.engine = engine
        self.per_subscriber = per_subscriber
        self.web = web
        self.policy = policy or checks.RequestPolicy.make(checks.is_loopback_bind(address[0]))
        self.serve_mi = serve_mi
        self.serve_metrics = serve_metrics
        self.ready = ready
        self.security = security if security is not None else checks.SecurityCounters()
        self.name = name
        self.security.listeners.add(name)
        self.max_body = max_body
        self.timeout = timeout
        self.request_deadline = request_deadline
        self.max_connections = _descriptor_room(max_connections)
        self.buffer_budget = max(BUFFER_BUDGET, 4 * (max_body + MAX_HEAD))
        self.counters = dict.fromkeys(
            ("accepted", "refused", "evicted", "timed_out", "shed", "accept_errors"), 0
        )
        listener = socket.socket(_family(address[0]), socket.SOCK_STREAM)
        opened = [listener]
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(1024)  # a burst of connections waits here for the loop
            listener.setblocking(False)
            # Workers wake the loop up through this pair when a reply is ready.
            self._wake_r, self._wake_w = socket.socketpair()
            opened += [self._wake_r, self._wake_w]
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector = selectors.DefaultSelector()
            self._selector.register(listener, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        self.listener = listener
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._conns: dict[int, _Conn] = {}
        # Connections waiting on their client (reading a request, writing a reply,
        # draining), the one that has waited longest first: evicted in this order.
        self._waiting: OrderedDict[int, _Conn] = OrderedDict()
        self._timers: list[tuple[float, int, _Conn]] = []  # a heap; stale entries skipped
        self._seq = itertools.count()
        self._buffered = 0
        self._refusing: dict[int, _Conn] = {}  # refused connections draining
        self._accept_paused = False
        self._accept_resume = 0.0
        self._accept_logged = 0.0
        self._done: deque[tuple[_Conn, _Request, bytes]] = deque()  # from the workers
        self._stopping = False
        self._stopped = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._mi_jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._metrics_jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(
                target=self._work,
                args=(jobs, answer),
                name=f"edg-mi-http-{name}{i}",
                daemon=True,
            )
            for jobs, answer, name, count in (
                (self._mi_jobs, self._answer_mi, "mi", MI_WORKERS),
                (self._metrics_jobs, self._answer_metrics, "metrics", METRICS_WORKERS),
            )
            for i in range(count)
        ]
        self._thread = threading.Thread(target=self._serve, name="edg-mi-http", daemon=True)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._thread.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        if self._thread.ident is not None:
            self._wake()
            self._thread.join(5)
        for jobs in (self._mi_jobs, self._metrics_jobs):
            for _ in self._workers:
                jobs.put(None)
        deadline = time.monotonic() + 1.0  # a handler stuck on the engine: left behind
        for worker in self._workers:
            if worker.ident is not None:
                worker.join(max(0.0, deadline - time.monotonic()))
        self._close_all()

    def _close_all(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for conn in [*self._conns.values(), *self._refusing.values()]:
            self._close(conn)
        for sock in (self.listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self._selector.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    # -- the loop -----------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._selector.select(self._wait(time.monotonic())):
                    conn: _Conn | None = key.data
                    if conn is None:
                        if key.fileobj is self.listener:
                            self._accept()
                        else:
                            with contextlib.suppress(OSError):
                                while self._wake_r.recv(4096):
                                    pass
                        continue
                    if conn.closed:  # by an eviction earlier in this batch
                        continue
                    try:
                        if conn.handshaking:
                            self._handshake(conn)
                        elif mask & selectors.EVENT_WRITE and conn.state == _WRITE:
                            self._write(conn)
                        elif mask & selectors.EVENT_READ:
                            self._read(conn)
                    except Exception:
                        log.exception("HTTP MI: a connection failed")
                        self._close(conn)
                self._complete()
                self._expire(time.monotonic())
        except Exception:
            log.exception("HTTP MI: the server loop failed")
        finally:
            self._close_all()

    def _wait(self, now: float) -> float:
        until = now + 1.0
        if self._timers:
            until = min(until, self._timers[0][0])
        if self._accept_paused:
            until = min(until, self._accept_resume)
        return max(0.0, until - now)

    def _expire(self, now: float) -> None:
        if self._accept_paused and now >= self._accept_resume:
            self._accept_paused = False
            self._selector.register(self.listener, selectors.EVENT_READ, None)
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if conn.closed or conn.deadline != deadline:
                continue  # a deadline since replaced
            if conn.state != _LINGER:
                self.counters["timed_out"] += 1
            if conn.handshaking:
                self.security.add(self.security.tls_failures, self.name, "timeout")
            self._close(conn)

    def _set_deadline(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), conn))

    def _interest(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if events == 0:
            self._selector.unregister(conn.sock)
        elif conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _account(self, conn: _Conn) -> None:
        held = len(conn.inbuf) + len(conn.out) - conn.sent
        self._buffered += held - conn.held
        conn.held = held

    def _waits(self, conn: _Conn) -> None:
        """The connection starts waiting on its client: last in the eviction order."""
        self._waiting[conn.fd] = conn
        self._waiting.move_to_end(conn.fd)

    # -- connections --------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(256):  # then let the others have the loop
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client is gone already
                # Out of descriptors (or memory): stop listening a moment, never spin.
                # Nothing is evicted for it: the open-files limit has room for
                # max_connections, so whatever holds the descriptors is not us.
                self.counters["accept_errors"] += 1
                now = time.monotonic()
                if now >= self._accept_logged:
                    self._accept_logged = now + 10.0
                    log.warning(
                        "HTTP MI: accept failed (%s; %d times so far): not listening for %.1f s",
                        exc.strerror or exc,
                        self.counters["accept_errors"],
                        ACCEPT_BACKOFF_S,
                    )
                self._accept_paused = True
                self._accept_resume = now + ACCEPT_BACKOFF_S
                self._selector.unregister(self.listener)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        if len(self._conns) >= self.max_connections and not self._evict():
            self._refuse_connection(sock)  # every connection has a request being answered
            return
        try:
            sock.setblocking(False)
            # No Nagle delay on a reply's last segment (or on a 100 Continue).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return
        self.counters["accepted"] += 1
        web = self.web
        context = None
        if web is not None:
            web.maybe_reload()  # new certificates or users: at most one stat() round a second
            context = web.context
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                sock.close()
                return
        conn = _Conn(sock)
        conn.handshaking = context is not None
        self._conns[conn.fd] = conn
        self._wait_for_head(conn)

    def _handshake(self, conn: _Conn) -> None:
        """One step of a TLS handshake, as far as the bytes received allow."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._interest(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._interest(conn, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:
            self.security.add(self.security.tls_failures, self.name, "error")
            log.debug("HTTP %s: TLS handshake failed: %s", self.name, exc)
            self._close(conn)
            return
        conn.handshaking = False
        self._interest(conn, selectors.EVENT_READ)
        self._read(conn)  # the request may be decrypted and buffered already

    def _refuse_connection(self, sock: socket.socket) -> None:
        """A 503, then a short drain (a few at once) so that a reset does not lose it."""
        self.counters["refused"] += 1
        try:
            sock.setblocking(False)
            sock.send(_SATURATED)
        except OSError:
            sock.close()
            return
        if len(self._refusing) >= REFUSED_LINGERING:
            sock.close()
            return
        conn = _Conn(sock)
        conn.counted = False
        self._refusing[conn.fd] = conn
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        conn.state = _LINGER
        self._set_deadline(conn, time.monotonic() + min(LINGER_S, self.timeout))
        self._interest(conn, selectors.EVENT_READ)

    def _evict(self) -> bool:
        """Close the connection that has waited longest on its client, if there is one."""
        if not self._waiting:
            return False
        _, conn = self._waiting.popitem(last=False)
        self.counters["evicted"] += 1
        # Read what it sent and the loop has not read yet (a burst accepted in one go
        # is evicted unread): close() with unread input sends a reset, not a FIN.
        with contextlib.suppress(OSError):
            for _ in range(EVICT_DRAIN_READS):
                if not conn.sock.recv(RECV_BYTES):
                    break
        self._close(conn)
        return True

    def _shed(self) -> None:
        """Over the buffer budget: close connections holding bytes, longest waiting first."""
        for conn in list(self._waiting.values()):
            if self._buffered <= self.buffer_budget:
                return
            if conn.held:
                self.counters["shed"] += 1
                self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if not conn.counted:
            self._refusing.pop(conn.fd, None)
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0
        if conn.counted:
            self._conns.pop(conn.fd, None)
            self._waiting.pop(conn.fd, None)
        conn.inbuf = bytearray()
        conn.out, conn.sent = _EMPTY, 0
        self._account(conn)
        conn.sock.close()

    def _wait_for_head(self, conn: _Conn) -> None:
        conn.state = _HEAD
        conn.request = None
        conn.line_end = -1
        conn.scan = 0
        self._waits(conn)
        self._set_deadline(conn, time.monotonic() + self.timeout)
        self._interest(conn, selectors.EVENT_READ)

    def _read(self, conn: _Conn) -> None:
        sock = conn.sock
        try:
            data = sock.recv(RECV_BYTES)
            if isinstance(sock, ssl.SSLSocket) and data:
                while (pending := sock.pending()) > 0:  # decrypted, not seen by select
                    data += sock.recv(pending)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:  # reset, or a TLS error
            self._close(conn)
            return
        if conn.state == _LINGER:
            conn.drained += len(data)
            if not data or conn.drained > LINGER_BYTES:
                self._close(conn)
            return
        if not data:
            conn.eof = True
        else:
            conn.inbuf += data
            self._account(conn)
            if self._buffered > self.buffer_budget:
                self._shed()
                if conn.closed:
                    return
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Go as far as the bytes received allow: parse a head, take a body, dispatch."""
        while not conn.closed:
            if conn.state == _HEAD:
                if not self._parse_head(conn):
                    if conn.eof:
                        self._close(conn)
                    return
            elif conn.state == _BODY:
                if len(conn.inbuf) < conn.need:
                    if conn.eof:  # the client went away
                        self._close(conn)
                    return
                body = bytes(conn.inbuf[: conn.need])
                del conn.inbuf[: conn.need]
                self._account(conn)
                assert conn.request is not None
                self._dispatch(conn, self._mi_jobs, conn.request, body)
                return
            else:
                return

    # -- requests -----------------------------------------------------------------------

    def _parse_head(self, conn: _Conn) -> bool:
        """False: more bytes are needed; True: the connection moved on (a request to
        read or answer, an error answered, or closed)."""
        buf = conn.inbuf
        if conn.line_end < 0:
            nl = buf.find(b"\n", conn.scan, MAX_HEAD + 1)
            if nl < 0:
                if len(buf) > MAX_HEAD:
                    self._error(conn, None, 414, "the request line is over 64 KiB")
                    return True
                conn.scan = len(buf)
                return False
            request = self._request_line(conn, bytes(buf[: nl + 1]))
            if request is None:
                return True
            conn.request = request
            conn.line_end = conn.scan = nl
        request = conn.request
        assert request is not None
        found = _HEAD_END.search(buf, conn.scan)
        if found is None or found.end() > MAX_HEAD:
            if found is not None or len(buf) > MAX_HEAD:
                self._error(conn, request, 431, "the request head is over 64 KiB")
                return True
            conn.scan = max(conn.line_end, len(buf) - 2)
            return False
        head = bytes(buf[conn.line_end + 1 : found.end()])
        del buf[: found.end()]
        self._account(conn)
        bad = checks.parse_head(request, head)
        if bad is not None:
            self._error(conn, request, bad.status, bad.message)
            return True
        if not self._admissible(conn, request):
            return True
        if request.method == "POST":
            self._post(conn, request)
        elif request.method in ("GET", "HEAD"):
            self._get(conn, request)
        else:
            self._error(conn, request, 501, f"Unsupported method ({request.method!r})")
        return True

    def _admissible(self, conn: _Conn, request: _Request) -> bool:
        """The browser checks and what authentication the loop can decide; False:
        refused (answered, closing)."""
        refusal = checks.check(self.policy, request.method, request.path, request.headers)
        if refusal is not None:
            self.security.add(self.security.refused, self.name, refusal.reason)
            text = f"{refusal.message}\n".encode(errors="replace")
            self._plain(conn, request, refusal.status, text)
            return False
        if self.web is None:
            return True
        verdict = self.web.check(request.headers.get("Authorization"))
        if verdict in (webconfig.MISSING, webconfig.MALFORMED):
            self.security.add(self.security.auth_failures, self.name, verdict)
            request.close = True
            self._reply(conn, _unauthorized(request), close=True)
            return False
        request.verify = verdict == webconfig.VERIFY
        return True

    def _request_line(self, conn: _Conn, line: bytes) -> _Request | None:
        """The request line (None: answered or closed)."""
        parsed = checks.parse_request_line(line)
        if parsed is None:
            self._close(conn)
        elif isinstance(parsed, checks.Status):
            self._error(conn, None, parsed.status, parsed.message)
            return None
        return parsed

    def _get(self, conn: _Conn, request: _Request) -> None:
        path = request.path.split("?", 1)[0]
        if path in ("/health", "/ready") or (path == "/metrics" and self.serve_metrics):
            self._dispatch(conn, self._metrics_jobs, request, b"")
        elif path == "/mi" and self.serve_mi:
            self._plain(conn, request, 405, b"the MI takes JSON-RPC requests by POST\n")
        else:
            self._plain(conn, request, 404, self._not_found())

    def _not_found(self) -> bytes:
        paths = ["POST /mi"] if self.serve_mi else []
        paths += ["GET /metrics"] if self.serve_metrics else []
        return f"not found: try {' or '.join([*paths, 'GET /health', 'GET /ready'])}\n".encode()

    def _post(self, conn: _Conn, request: _Request) -> None:
        if request.path.split("?", 1)[0] != "/mi" or not self.serve_mi:
            self._plain(conn, request, 404, self._not_found())
            return
        length = checks.body_length(request, self.max_body)
        if isinstance(length, checks.Status):
            self._refuse(conn, request, length.status, length.message)
            return
        headers = request.headers
        conn.state = _BODY
        conn.need = length
        self._set_deadline(conn, time.monotonic() + self.request_deadline)
        expect = (headers.get("Expect") or "").lower()
        if expect == "100-continue" and request.version >= "HTTP/1.1" and len(conn.inbuf) < length:
            with contextlib.suppress(OSError):  # an empty send buffer: it fits
                conn.sock.send(_CONTINUE)

    def _plain(self, conn: _Conn, request: _Request, status: int, text: bytes) -> None:
        self._reply(conn, _response(request, status, text, "text/plain", close=True), close=True)

    def _refuse(self, conn: _Conn, request: _Request, status: int, why: str) -> None:
        """Answer with a JSON-RPC -32600 error and drop the connection (body unread)."""
        body = error_reply(-32600, "Invalid Request", why)
        self._reply(conn, _response(request, status, body, JSON, close=True), close=True)

    def _error(self, conn: _Conn, request: _Request | None, status: int, message: str) -> None:
        """A request that is not one: answered as http.server's send_error, then closed."""
        body = f"Error {status} ({HTTPStatus(status).phrase}): {message}\n".encode(errors="replace")
        self._reply(conn, _response(request, status, body, "text/plain", close=True), close=True)

    def _dispatch(
        self, conn: _Conn, jobs: queue.SimpleQueue[_Job | None], request: _Request, body: bytes
    ) -> None:
        """A complete request: to the workers; the connection waits on them, not its
        client, so it is neither evicted nor timed out meanwhile."""
        conn.state = _BUSY
        conn.deadline = float("inf")
        self._waiting.pop(conn.fd, None)
        self._interest(conn, 0)
        jobs.put((conn, request, body))

    def _complete(self) -> None:
        while self._done:
            conn, request, reply = self._done.popleft()
            if conn.closed or conn.state != _BUSY:
                continue
            try:
                self._reply(conn, reply, request.close)
            except Exception:
                log.exception("HTTP MI: a reply failed")
                self._close(conn)

    def _reply(self, conn: _Conn, data: bytes, close: bool) -> None:
        conn.state = _WRITE
        conn.out, conn.sent, conn.close_after = memoryview(data), 0, close
        self._account(conn)
        self._waits(conn)
        self._set_deadline(conn, time.monotonic() + self.request_deadline)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        out = conn.out
        while conn.sent < len(out):
            try:
                conn.sent += conn.sock.send(out[conn.sent :])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._account(conn)
                self._interest(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
        conn.out, conn.sent = _EMPTY, 0
        self._account(conn)
        if conn.close_after:
            self._linger(conn)
        else:
            self._wait_for_head(conn)
            self._advance(conn)  # a pipelined request may be in already

    def _linger(self, conn: _Conn) -> None:
        """Close after a reply, without a reset that could lose it: send our FIN, then
        drain what the client still sends (an unread body) for a moment."""
        conn.inbuf = bytearray()
        self._account(conn)
        if conn.eof:
            self._close(conn)
            return
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.state = _LINGER
        conn.drained = 0
        self._waits(conn)
        self._set_deadline(conn, time.monotonic() + min(LINGER_S, self.timeout))
        self._interest(conn, selectors.EVENT_READ)

    # -- the workers ----------------------------------------------------------------------

    def _work(
        self,
        jobs: queue.SimpleQueue[_Job | None],
        answer: Callable[[_Request, bytes], bytes],
    ) -> None:
        while (job := jobs.get()) is not None:
            conn, request, body = job
            try:
                if request.verify and not self._verified(request):
                    reply = _unauthorized(request)
                else:
                    reply = answer(request, body)
            except Exception:
                log.exception("HTTP MI: answering %s %s failed", request.method, request.path)
                request.close = True
                reply = _response(request, 500, b"internal error\n", "text/plain", close=True)
            self._done.append((conn, request, reply))
            self._wake()

    def _verified(self, request: _Request) -> bool:
        """The bcrypt check the loop left to a worker (counted when it fails)."""
        assert self.web is not None
        verdict = self.web.verify(request.headers.get("Authorization") or "")
        if verdict == webconfig.OK:
            return True
        self.security.add(self.security.auth_failures, self.name, verdict)
        request.close = True
        return False

    def _answer_mi(self, request: _Request, body: bytes) -> bytes:
        reply = handle(self.engine, body)
        if reply is None:  # a notification: nothing to say
            return _response(request, 204, close=request.close)
        return _response(request, 200, reply, JSON, close=request.close)

    def _answer_metrics(self, request: _Request, _body: bytes) -> bytes:
        path = request.path.split("?", 1)[0]
        if path == "/health":
            return _response(request, 200, b"OK\n", "text/plain", close=request.close)
        if path == "/ready":
            reasons = self.ready() if self.ready is not None else []
            if reasons:
                text = ("not ready:\n" + "\n".join(reasons) + "\n").encode(errors="replace")
                return _response(request, 503, text, "text/plain", close=request.close)
            return _response(request, 200, b"ready\n", "text/plain", close=request.close)
        try:
            import engine.metrics as metrics  # here: the MI serves without prometheus
        except ModuleNotFoundError as exc:
            if exc.name != "engine.metrics":
                raise
            why = b"metrics are not available: engine.metrics is missing\n"
            return _response(request, 503, why, "text/plain", close=request.close)
        try:
            body, content_type = metrics.exposition(
                self.engine,
                per_subscriber=self.per_subscriber,
                accept=request.headers.get("Accept"),
                http=self.security,
            )
        except Exception as exc:
            log.exception("metrics exposition failed")
            why = f"metrics exposition failed: {exc}\n".encode()
            return _response(request, 500, why, "text/plain", close=request.close)
        return _response(request, 200, body, content_type, close=request.close)


def _unauthorized(request: _Request) -> bytes:
    challenge = f'WWW-Authenticate: Basic realm="{SERVER}", charset="UTF-8"'
    return _response(
        request, 401, b"authentication required\n", "text/plain", close=True, extra=(challenge,)
    )


class HTTPServer:
    """``POST /mi``, ``GET /metrics``, ``/health`` and ``/ready`` on one address,
    served by an event-loop thread and a few worker threads (see the module's
    docstring for the limits).

    ``per_subscriber`` is passed to engine.metrics.exposition (config
    ``[metrics] per_subscriber``), with the request's Accept header.
    ``web``: TLS and basic authentication (None: plain HTTP, no authentication);
    ``policy``: the browser checks (default: the Host check when bound to
    loopback, no Origin allowed); ``serve_mi``/``serve_metrics``: which of
    ``POST /mi`` and ``GET /metrics`` this listener serves; ``ready``: the
    reasons the engine is not ready (``GET /ready``: 503 with them); ``security``:
    the counters of what was refused (shared by the listeners, read by the
    metrics), under the label ``name``.
    """

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        *,
        max_body: int = MAX_BODY,
        timeout: float = TIMEOUT,
        request_deadline: float = REQUEST_DEADLINE,
        max_connections: int = MAX_CONNECTIONS,
        per_subscriber: bool = False,
        web: webconfig.WebConfig | None = None,
        policy: checks.RequestPolicy | None = None,
        serve_mi: bool = True,
        serve_metrics: bool = True,
        ready: Callable[[], list[str]] | None = None,
        security: checks.SecurityCounters | None = None,
        name: str = "mi",
    ) -> None:
        self.web = web
        self._server = _HTTPServer(
            address,
            engine,
            max_body=max_body,
            timeout=timeout,
            request_deadline=request_deadline,
            max_connections=max_connections,
            per_subscriber=per_subscriber,
            web=web,
            policy=policy,
            serve_mi=serve_mi,
            serve_metrics=serve_metrics,
            ready=ready,
            security=security,
            name=name,
        )
        self.address: tuple[str, int] = self._server.address

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        """Stop serving and close every socket; also for a server never started."""
        self._server.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.web is not None and self.web.tls else "http"
        return f"{scheme}://{format_listen(self.address)}/mi"

    @property
    def security(self) -> checks.SecurityCounters:
        return self._server.security

    @property
    def max_connections(self) -> int:
        """The connections open at once (``max_connections``, or fewer when the
        open-files limit has no room for them)."""
        return self._server.max_connections

    def counters(self) -> dict[str, int]:
        """Connections open now; accepted, refused (503), evicted to make room, timed
        out, shed (over the buffer budget) so far; and accept() failures."""
        return {"open": len(self._server._conns), **self._server.counters}


# -- UDP datagram ---------------------------------------------------------------------------
