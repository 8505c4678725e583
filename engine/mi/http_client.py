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

An https:// target is verified against `ClientAuth.ca_file` (default: the
system's CAs) and may present a client certificate (mutual TLS); its handshake
runs non-blocking, so a server that stalls it fails at the deadline. Basic-auth
credentials go in an `Authorization: Basic` header. The password is never part
of a message: a URL with one is refused (it would be shown in errors and logs,
and on a command line in argv), and a 401 says only that authentication failed.
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Final

from engine.errors import MIClientError

MAX_LINE: Final = 16384  # bytes of one status or header line
MAX_HEADERS: Final = 100


@dataclass(frozen=True)
class ClientAuth:
    """How to reach an authenticated MI: the CA to trust, a client certificate, and
    basic-auth credentials. The password is read from `password_file` at each call
    (a rotated one is taken without a restart) unless given as `password`; neither
    is ever in repr() or a message."""

    ca_file: str = ""  # PEM CA certificates to trust; "" = the system's
    cert_file: str = ""  # PEM client certificate (mutual TLS); may hold the key too
    key_file: str = ""  # its key, when not in cert_file
    user: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""

    def secret(self) -> str:
        """The password: `password`, or the first line of `password_file`."""
        if self.password or not self.password_file:
            return self.password
        return read_password_file(self.password_file)

    def tls_context(self) -> ssl.SSLContext:
        """A verifying client context (read per call: renewed files are taken)."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise MIClientError(f"cannot load the CA file {self.ca_file}: {_why(exc)}") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise MIClientError(
                    f"cannot load the client certificate {self.cert_file}: {_why(exc)}"
                ) from None
        return context


def read_password_file(path: str) -> str:
    """The first line of `path`, without its line end; MIClientError naming the file
    (never its content) when it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            first = f.read(4096).split(b"\n", 1)[0].rstrip(b"\r")
    except OSError as exc:
        raise MIClientError(f"cannot read the password file {path}: {_why(exc)}") from None
    if not first:
        raise MIClientError(f"the password file {path} is empty (its first line is the password)")
    try:
        return first.decode()
    except UnicodeDecodeError:
        raise MIClientError(f"the password file {path} is not UTF-8") from None


def _why(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or str(exc)


def url_password_problem(url: str) -> str | None:
    """Why `url` must not be used (it holds a password), or None."""
    if not url.startswith(("http://", "https://")):
        return None
    netloc = urllib.parse.urlsplit(url).netloc
    userinfo, at, _ = netloc.rpartition("@")
    if at and ":" in userinfo:
        return (
            "a password in the MI URL is refused (it would be readable in ps and in"
            " messages): give the user in the URL or --user, and the password in"
            " --password-file PATH or $EVENT_DATAGRAM_MI_PASSWORD"
        )
    return None


def shown(url: str) -> str:
    """`url` as messages show it: without any user information."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


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


def http_post(
    url: str, body: bytes, deadline: float, limit: int, auth: ClientAuth | None = None
) -> bytes:
    """POST `body` (JSON) to `url`; the reply body (also for an HTTP error status when
    it is JSON: a JSON-RPC error sent with 4xx/5xx). Raises MIClientError."""
    if url_password_problem(url):
        raise MIClientError(f"MI target {shown(url)}: {url_password_problem(url)}")
    auth = auth or ClientAuth()
    parts = urllib.parse.urlsplit(url)
    url = shown(url)  # from here on, messages name it without user information
    host = parts.hostname
    if not host:
        raise MIClientError(f"MI target {url!r}: no host")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise MIClientError(f"MI target {url!r}: bad port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    user = auth.user or urllib.parse.unquote(parts.username or "")
    authorization = ""
    if user:
        if ":" in user:
            raise MIClientError(f"MI user {user!r}: a basic-auth user name has no ':'")
        token = base64.b64encode(f"{user}:{auth.secret()}".encode()).decode()
        authorization = f"Authorization: Basic {token}\r\n"
    context = auth.tls_context() if tls else None  # before connecting: a bad file fails fast
    left = deadline - time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=max(0.001, left))
    except TimeoutError:
        raise MIClientError(f"cannot reach the MI at {url}: timed out", "timeout") from None
    except OSError as exc:
        raise MIClientError(f"cannot reach the MI at {url}: {exc.strerror or exc}") from None
    try:
        if context is not None:
            sock = _handshake(context, sock, host, url, deadline)
        netloc = parts.netloc.rpartition("@")[2]  # the Host header never carries a user
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\n{authorization}"
            "Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            _send_all(sock, head + body, deadline)
        except TimeoutError:
            raise MIClientError(f"{url}: the request was not taken in time", "timeout") from None
        except OSError as exc:
            raise MIClientError(f"cannot reach the MI at {url}: {exc}") from None
        return _reply(_Reader(sock, url, deadline, limit), url)
    finally:
        sock.close()


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    """sendall by the deadline (an SSLSocket's sendall gives each piece the whole
    timeout again; here every piece waits at most for what is left)."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        view = view[sock.send(view) :]


def _handshake(
    context: ssl.SSLContext, sock: socket.socket, host: str, url: str, deadline: float
) -> ssl.SSLSocket:
    """The TLS handshake, non-blocking, by the deadline (a blocking one with a socket
    timeout restarts the timeout at every byte a stalling server trickles)."""
    sock.setblocking(False)
    try:
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except (ssl.SSLError, OSError) as exc:
        raise MIClientError(f"cannot reach the MI at {url}: {exc}") from None
    poller = select.poll()
    poller.register(tls, select.POLLIN)
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            poller.modify(tls, select.POLLIN)
        except ssl.SSLWantWriteError:
            poller.modify(tls, select.POLLOUT)
        except ssl.SSLCertVerificationError as exc:
            raise MIClientError(
                f"cannot reach the MI at {url}: its certificate is not trusted"
                f" ({exc.verify_message}; --ca-file names the CA to trust)"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise MIClientError(f"cannot reach the MI at {url}: TLS handshake: {exc}") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise MIClientError(f"{url}: TLS handshake not done by the deadline", "timeout")
        poller.poll(max(1, int(left * 1000)))  # ready or not, the next round decides


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
    if code == 401:  # whatever its body says: the one clear message
        raise MIClientError(
            f"{url}: authentication failed (HTTP 401): check the user and the password"
        )
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
