"""A fake OpenSIPS MI on loopback that misbehaves on purpose, run as a process of
its own: ``python -m tests.helpers.hostile_mi MODE [EVENTS]``. It prints one line,
``ready http://127.0.0.1:PORT/mi udp:127.0.0.1:PORT``, then serves HTTP and UDP
until killed. SIGUSR1 makes it a well-behaved MI (the upstream "recovers").

Modes (HTTP unless named udp_):
  good          answers events_list, event_subscribe, subscribers_list as OpenSIPS
  truncated     a 200 whose body stops short of its Content-Length, then closes
  garbage       a reply that is not HTTP at all, then closes
  trickle       a 200 whose body comes one byte every 0.5 s, for as long as read
  huge          a 200 with a 300 MB body, generated and streamed (never held)
  huge_chunked  the same, chunked, without a Content-Length
  udp_garbage   UDP replies that are not JSON-RPC (bytes, JSON nested 32,000 deep)
  renaming      good, but events_list names new events at every call
  chunked       good, each reply after a 100 Continue and in 7-byte chunks
EVENTS is how many events events_list shows (default 3).
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Any

HUGE = 300 * 1000 * 1000


class MI:
    def __init__(self, mode: str, events: int) -> None:
        self.mode = mode
        self.n = events
        self.generation = itertools.count()
        self.names = [f"E_HOSTILE_{i}" for i in range(events)]
        self.subs: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def answer(self, request: bytes) -> bytes:
        """The JSON-RPC reply a well-behaved MI gives to `request`."""
        try:
            req = json.loads(request)
            method, params, rid = req["method"], req.get("params") or [], req.get("id")
        except (ValueError, KeyError, TypeError):
            return b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
        result: Any
        error: tuple[int, str] | None = None
        with self.lock:
            if method == "events_list":
                if self.mode == "renaming":
                    g = next(self.generation)
                    self.names = [f"E_R{g}_{i}" for i in range(self.n)]
                result = {"Events": [{"name": n, "id": i} for i, n in enumerate(self.names)]}
            elif method == "event_subscribe":
                event, sock, expire = params[0], params[1], params[2] if len(params) > 2 else 3600
                if event not in self.names:
                    error = (400, "Bad parameter value")
                else:
                    if int(expire) == 0:
                        self.subs.pop((event, sock), None)
                    else:
                        self.subs[(event, sock)] = int(expire)
                    result = "OK"
            elif method == "subscribers_list":
                event, sock = params[0], params[1]
                if event not in self.names:
                    error = (404, "Event not published")
                elif (event, sock) not in self.subs:
                    error = (404, "Subscriber does not exist")
                else:
                    sub = {"socket": sock, "expire": self.subs[(event, sock)]}
                    result = {"Event": {"name": event, "Subscriber": sub}}
            else:
                error = (-32601, "Method not found")
        if error:
            body = {"jsonrpc": "2.0", "error": {"code": error[0], "message": error[1]}, "id": rid}
        else:
            body = {"jsonrpc": "2.0", "result": result, "id": rid}
        return json.dumps(body).encode()


def http_handler(mi: MI) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(5)
            try:
                request = self._read(sock)
                self._reply(sock, request)
            except OSError:
                pass  # the client gave up (that is the point of most modes)

        @staticmethod
        def _read(sock: socket.socket) -> bytes:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return b""
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            return body

        def _reply(self, sock: socket.socket, request: bytes) -> None:
            mode = mi.mode
            if mode == "truncated":
                sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"jsonrpc":')
            elif mode == "garbage":
                sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff garbage \x01\x02\r\n")
            elif mode == "trickle":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(100000):
                    sock.sendall(b" ")
                    time.sleep(0.5)
            elif mode in ("huge", "huge_chunked"):
                block = b"[" * 65536
                if mode == "huge":
                    sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n".encode())
                    for _ in range(HUGE // len(block)):
                        sock.sendall(block)
                else:
                    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
                    for _ in range(HUGE // len(block)):
                        sock.sendall(frame)
            elif mode == "chunked":  # well-behaved, in the less common form
                body = mi.answer(request)
                out = b"HTTP/1.1 100 Continue\r\n\r\n"
                out += b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                for i in range(0, len(body), 7):
                    piece = body[i : i + 7]
                    out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
                sock.sendall(out + b"0\r\nX-Trailer: 1\r\n\r\n")
            else:
                body = mi.answer(request)
                head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                head += f"Content-Length: {len(body)}\r\n\r\n"
                sock.sendall(head.encode() + body)

    return Handler


def serve_udp(mi: MI, sock: socket.socket) -> None:
    deep = b"[" * 32000 + b"]" * 32000  # one datagram; past any decoder's depth
    garbage = itertools.cycle([b"\x00\xffnot json", deep, b'"a string"', b'{"jsonrpc":"2.0"}'])
    while True:
        request, peer = sock.recvfrom(65536)
        if mi.mode == "udp_garbage":
            reply = next(garbage)
            sock.sendto(reply, peer)
        else:
            sock.sendto(mi.answer(request), peer)


def main(argv: list[str]) -> int:
    mode = argv[0]
    mi = MI(mode, int(argv[1]) if len(argv) > 1 else 3)

    def recover(*_: object) -> None:
        mi.mode = "good"

    signal.signal(signal.SIGUSR1, recover)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    http = socketserver.ThreadingTCPServer(("127.0.0.1", 0), http_handler(mi))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    threading.Thread(target=serve_udp, args=(mi, udp), daemon=True).start()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    port = http.server_address[1]
    print(f"ready http://127.0.0.1:{port}/mi udp:127.0.0.1:{udp.getsockname()[1]}", flush=True)
    while True:  # until SIGTERM; SIGUSR1's handler runs between sleeps
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
