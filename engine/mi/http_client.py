"""One HTTP/1.1 POST with a whole-call deadline and a reply-size limit (client.py's
http:// and https:// targets).

Not urllib: its timeout is per socket read (a reply trickled a byte every half
second never times out), it reads a body of any size into memory, and what it
raises for a broken peer (IncompleteRead, BadStatusLine, ...) is a zoo. Here
every read waits at most until the deadline, every byte counts against the
limit (a Content-Length over it is refused before any body is read), and every
failure is an MIClientError with a reason: "unreachable" (no connection),
"timeout", "bad_reply" (not HTTP, cut short, a bad chunk) or "too_large".
Replies may have a Content-Length, be chunked, or end when the server closes.
"""

from __future__ import annotations

import socket
import ssl
import time
import urllib.parse
from typing import Final

from engine.errors import MIClientError

MAX_LINE: Final = 16384  # bytes of one status or header line
MAX_HEADERS: Final = 100


class _Reader:
    """Bytes off a socket, by the deadline and within the limit."""

    def __init__(self, sock: socket.socket, url: str, deadline: float, limit: int) -> None:
        self.sock = sock
        self.url = url
        self.deadline = deadline
        self.limit = limit
        self.buf = bytearray()
        self.total = 0  # bytes received so far, headers included
        self.eof = False

    def _fill(self) -> None:
        """Receive more (raises at the deadline or the limit); sets eof at the end."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MIClientError(f"{self.url}: no whole answer by the deadline", "timeout")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(min(65536, self.limit - self.total + 1))
        except TimeoutError:
            raise MIClientError(f"{self.url}: no whole answer by the deadline", "timeout") from None
        except OSError as exc:
            raise MIClientError(
                f"{self.url}: connection failed mid-reply: {exc}", "bad_reply"
            ) from None
        if not chunk:
            self.eof = True
            return
        self.total += len(chunk)
        if self.total > self.limit:
            raise MIClientError(f"{self.url} answered more than {self.limit} bytes", "too_large")
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                out = bytes(self.buf[:end]).rstrip(b"\r")
                del self.buf[: end + 1]
                return out
            if len(self.buf) > MAX_LINE:
                raise _bad(self.url, "a header line too long")
            if self.eof:
                raise _bad(self.url, "cut short in its headers")
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise _bad(self.url, f"cut short: {len(self.buf)} of {n} body bytes")
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        while not self.eof:
            self._fill()
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _bad(url: str, what: str) -> MIClientError:
    return MIClientError(f"{url} answered {what}", "bad_reply")


def http_post(url: str, body: bytes, deadline: float, limit: int) -> bytes:
    """POST `body` (JSON) to `url`; the reply body (also for an HTTP error status when
    it is JSON: a JSON-RPC error sent with 4xx/5xx). Raises MIClientError."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        raise MIClientError(f"MI target {url!r}: no host")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise MIClientError(f"MI target {url!r}: bad port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    left = deadline - time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=max(0.001, left))
    except TimeoutError:
        raise MIClientError(f"cannot reach the MI at {url}: timed out", "timeout") from None
    except OSError as exc:
        raise MIClientError(f"cannot reach the MI at {url}: {exc.strerror or exc}") from None
    try:
        if tls:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except TimeoutError:
                raise MIClientError(f"{url}: TLS handshake timed out", "timeout") from None
            except (ssl.SSLError, OSError) as exc:
                raise MIClientError(f"cannot reach the MI at {url}: {exc}") from None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.sendall(head + body)  # the timeout bounds the whole sendall
        except TimeoutError:
            raise MIClientError(f"{url}: the request was not taken in time", "timeout") from None
        except OSError as exc:
            raise MIClientError(f"cannot reach the MI at {url}: {exc}") from None
        return _reply(_Reader(sock, url, deadline, limit), url)
    finally:
        sock.close()


def _reply(reader: _Reader, url: str) -> bytes:
    while True:  # skip 1xx interim answers (a bounded number: each costs bytes)
        status = reader.line()
        fields = status.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
            raise _bad(url, f"with something that is not HTTP: {status[:80]!r}")
        code = int(fields[1])
        reason = fields[2].decode("latin-1", "replace") if len(fields) > 2 else ""
        headers: dict[bytes, bytes] = {}
        for _ in range(MAX_HEADERS + 1):
            line = reader.line()
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise _bad(url, f"a malformed header: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise _bad(url, f"more than {MAX_HEADERS} headers")
        if code >= 200:
            break
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = _chunked(reader, url)
    elif b"content-length" in headers:
        text = headers[b"content-length"]
        if not text.isdigit():
            raise _bad(url, f"a bad Content-Length {text[:40]!r}")
        length = int(text)
        if length > reader.limit:
            raise MIClientError(f"{url} answered {length} bytes, over {reader.limit}", "too_large")
        body = reader.exactly(length)
    else:
        body = reader.rest()
    if code != 200 and not body.startswith(b"{"):
        raise MIClientError(f"{url}: HTTP {code} {reason}", "bad_reply")
    return body


def _chunked(reader: _Reader, url: str) -> bytes:
    out = bytearray()
    while True:
        size_text = reader.line().split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _bad(url, f"a bad chunk size {size_text[:40]!r}") from None
        if size < 0 or len(out) + size > reader.limit:
            raise MIClientError(f"{url} answered more than {reader.limit} bytes", "too_large")
        if size == 0:
            while reader.line():  # trailers
                pass
            return bytes(out)
        out += reader.exactly(size)
        if reader.exactly(2) != b"\r\n":
            raise _bad(url, "a chunk without its CRLF")
