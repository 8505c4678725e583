"""MI over a named pipe, speaking OpenSIPS mi_fifo's framing.

A client writes ``:REPLY_FIFO:`` followed by one JSON-RPC request into the
FIFO, opens ``REPLY_DIR/REPLY_FIFO`` (a FIFO it created) for reading, and
gets the reply there, as compact JSON with no newline, like OpenSIPS.
``::`` (no reply FIFO name) runs the request without a reply. The request may
end with a newline, or not at all (opensips-cli writes none): like OpenSIPS we
find the end of the JSON value itself (it may span lines); a request that
does not start with ``{`` or ``[`` ends at the newline, and a line starting
with ``:`` always begins a new request. Several requests may follow each other.

Checks: the reply FIFO name must be a plain file name (no ``/``, ``\\``,
``.``, NUL, at most 255 bytes), the reply path must be a FIFO, not a symbolic
link and not hard-linked; the reply is written without ever blocking the
server for long (a client that does not read it within 2 s is dropped). A
request over ``max_request`` bytes (1 MiB) gets a -32600 error and is
discarded; an incomplete request is answered (a -32700 error) once no more
data has come for ``idle_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from engine.mi.dispatch import handle
from engine.mi.protocol import PARSE_ERROR, error_reply

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.mi_fifo")

MAX_REQUEST: Final = 1 << 20
_NAME: Final = re.compile(r"[^./\\\x00]{1,255}")
_TOKEN: Final = re.compile(rb'["{}\[\]\n]')
_STRING_END: Final = re.compile(rb'["\\\n]')
_WS: Final = b" \t\r\n"
OPEN_RETRIES: Final = 4  # like OpenSIPS: 4 x 80 ms for the client to open its reply FIFO
OPEN_WAIT_S: Final = 0.08
WRITE_TIMEOUT_S: Final = 2.0
MAX_REPLY_WRITERS: Final = 32  # replies being delivered at once; beyond, dropped (counted)


ScanState = tuple[int, int, bool]  # (position, depth, inside a string)


def json_end(
    buf: bytes | bytearray, start: int, resume: ScanState | None = None
) -> tuple[int | None, ScanState]:
    """Find the end of the JSON object/array starting at ``buf[start]``.

    Returns (index just past it, or None while incomplete; the state to resume
    from once more data has been appended), so a request arriving in many small
    pieces is scanned once, not once per piece. A line that starts with ``:``
    ends the value early (it is the next request's header): a request that is
    never completed cannot swallow the ones after it.
    """
    pos, depth, in_string = resume or (start, 0, False)
    while True:
        m = (_STRING_END if in_string else _TOKEN).search(buf, pos)
        if m is None:
            return None, (len(buf), depth, in_string)
        at = m.start()
        char = buf[at]
        if char == 0x0A:  # newline: does the next line start a new request?
            if at + 1 >= len(buf):
                return None, (at, depth, in_string)
            if buf[at + 1] == 0x3A:
                return at, (at, depth, in_string)
            pos = at + 1
        elif in_string:
            if char == 0x5C:  # a backslash escapes the next byte
                if at + 1 >= len(buf):
                    return None, (at, depth, True)
                pos = at + 2
            else:
                pos, in_string = at + 1, False
        elif char == 0x22:
            pos, in_string = at + 1, True
        elif char in b"{[":
            pos, depth = at + 1, depth + 1
        else:
            pos, depth = at + 1, depth - 1
            if depth <= 0:
                return pos, (pos, depth, False)


class FifoServer:
    """Serve the MI on a FIFO at ``path`` (created here, removed on stop)."""

    def __init__(
        self,
        engine: Engine,
        path: str,
        reply_dir: str = "/tmp",
        *,
        max_request: int = MAX_REQUEST,
        idle_timeout: float = 1.0,
        handler: Callable[[Engine, bytes], bytes | None] = handle,
    ) -> None:
        self._engine = engine
        self._handler = handler
        self.path = os.path.abspath(path)
        self.reply_dir = reply_dir
        self._max = max_request
        self._idle = idle_timeout
        self._buf = bytearray()
        self._scan: ScanState | None = None  # where the head request's scan stopped
        self._skip = False  # discarding an oversized request up to its newline
        self._last_data = time.monotonic()
        _make_fifo(self.path)
        self._ino = os.stat(self.path).st_ino
        self._rfd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # A writer of our own: the read end never sees EOF between clients.
        self._wfd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edg-mi-fifo", daemon=True)
        self._writers = threading.BoundedSemaphore(MAX_REPLY_WRITERS)
        self._dropped_lock = threading.Lock()
        self.replies_dropped = 0  # replies no client opened or read in time

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            with contextlib.suppress(OSError):
                os.write(self._wfd, b"\n")  # wake the reader up
            self._thread.join(5)
        os.close(self._rfd)
        os.close(self._wfd)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)

    @property
    def url(self) -> str:
        return f"fifo:{self.path}"

    def _run(self) -> None:
        while not self._stop.is_set():
            ready = _poll(self._rfd, select.POLLIN, 0.25)
            if ready:
                try:
                    chunk = os.read(self._rfd, 65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    log.warning("MI FIFO read failed: %s", exc)
                    time.sleep(0.05)
                    continue
                self._last_data = time.monotonic()
                self._feed(chunk)
            elif (self._buf or self._skip) and self._idle_for() >= self._idle:
                # No data for a while: what is buffered is all there will be.
                self._process(final=True)
                self._reset()

    def _idle_for(self) -> float:
        return time.monotonic() - self._last_data

    def _reset(self) -> None:
        self._buf.clear()
        self._scan, self._skip = None, False

    def _feed(self, chunk: bytes) -> None:
        if self._skip:
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            self._skip = False
            chunk = chunk[newline + 1 :]
        self._buf += chunk
        self._process()

    def _process(self, final: bool = False) -> None:
        """Take every complete request off the buffer (``final``: no more data is coming)."""
        buf = self._buf
        while True:
            lead = 0
            while lead < len(buf) and buf[lead] in _WS:
                lead += 1
            if lead:
                del buf[:lead]
                self._scan = None
            if not buf:
                return
            if buf[0] != 0x3A:  # ':'
                if self._discard_line("does not start with ':REPLY_FIFO:'", final):
                    continue
                return
            sep = buf.find(b":", 1, 258)
            if sep < 0:
                if (len(buf) >= 258 or final) and self._discard_line(
                    "has no valid ':REPLY_FIFO:' prefix", final
                ):
                    continue
                return
            name, body = bytes(buf[1:sep]), sep + 1
            while body < len(buf) and buf[body] in _WS:
                body += 1
            if body < len(buf) and buf[body] == 0x3A and b"\n" in buf[sep + 1 : body]:
                # An empty request: the next line is the next client's, not its body.
                del buf[:body]
                self._scan = None
                self._reply(name, error_reply(PARSE_ERROR, "Parse error", "empty request"))
                continue
            if body >= len(buf):
                if final:
                    self._reset()
                    self._reply(name, error_reply(PARSE_ERROR, "Parse error", "empty request"))
                return
            end: int | None
            if buf[body] in b"{[":
                end, self._scan = json_end(buf, body, self._scan)
            else:
                newline = buf.find(b"\n", body)
                end = newline if newline >= 0 else None
            if end is None:
                if len(buf) - body > self._max:
                    self._too_large(name)
                    return
                if not final:
                    return
                end = len(buf)
            request = bytes(buf[body:end])
            del buf[:end]
            self._scan = None
            if len(request) > self._max:
                self._reply(name, self._too_large_reply())
                continue
            self._request(name, request)

    def _discard_line(self, why: str, final: bool) -> bool:
        """Drop the bad line; False when its end has not arrived yet (nothing dropped)."""
        newline = self._buf.find(b"\n")
        if newline < 0 and not final:
            if len(self._buf) > self._max:
                self._reset()
                self._skip = True
            return False
        log.warning("MI FIFO: ignored input that %s", why)
        if newline < 0:
            self._buf.clear()
        else:
            del self._buf[: newline + 1]
        self._scan = None
        return True

    def _too_large(self, name: bytes) -> None:
        skip = self._buf.find(b"\n") < 0
        self._reset()
        self._skip = skip
        self._reply(name, self._too_large_reply())

    def _too_large_reply(self) -> bytes:
        why = f"request is over the {self._max}-byte FIFO limit"
        return error_reply(-32600, "Invalid Request", why)

    def _request(self, name: bytes, body: bytes) -> None:
        reply = self._handler(self._engine, body)
        if reply is not None:
            self._reply(name, reply)

    def _reply(self, name: bytes, reply: bytes) -> None:
        if not name:
            return  # "::" asks for no reply
        text = name.decode("utf-8", "replace")
        if not _NAME.fullmatch(text) or len(name) > 255:
            log.warning("MI FIFO: refused reply FIFO name %r (must be a plain file name)", text)
            return
        path = os.path.join(self.reply_dir, text)
        # Delivered by a thread of its own: a client that never opens its reply FIFO
        # (or never reads it) costs its own bounded wait, not everyone else's.
        if not self._writers.acquire(blocking=False):
            log.warning("MI FIFO: %d replies are waiting for their readers; reply to %s "
                        "dropped", MAX_REPLY_WRITERS, path)  # fmt: skip
            self._count_dropped()
            return
        threading.Thread(
            target=self._deliver, args=(path, reply), name="edg-mi-fifo-reply", daemon=True
        ).start()

    def _deliver(self, path: str, reply: bytes) -> None:
        try:
            fd = _open_reply(path)
            if fd is None:
                self._count_dropped()
                return
            try:
                if not _write_all(fd, reply, path):
                    self._count_dropped()
            finally:
                os.close(fd)
        finally:
            self._writers.release()

    def _count_dropped(self) -> None:
        with self._dropped_lock:
            self.replies_dropped += 1


def _poll(fd: int, events: int, timeout_s: float) -> bool:
    """Wait for `events` on `fd` (poll, not select: descriptors may pass 1023
    in a process that holds thousands of HTTP connections)."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


def _make_fifo(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISFIFO(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a FIFO")
        os.unlink(path)  # a FIFO left by an earlier run, like OpenSIPS does
    os.mkfifo(path, 0o600)


def _open_reply(path: str) -> int | None:
    for attempt in range(OPEN_RETRIES + 1):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ENXIO and attempt < OPEN_RETRIES:
                time.sleep(OPEN_WAIT_S)  # the client has not opened it for reading yet
                continue
            log.warning("MI FIFO: cannot open reply FIFO %s: %s", path, exc.strerror or exc)
            return None
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            log.warning("MI FIFO: refused reply path %s (not a FIFO, or hard-linked)", path)
            return None
        return fd
    return None


def _write_all(fd: int, data: bytes, path: str) -> bool:
    """Write all of `data` within WRITE_TIMEOUT_S; False (logged) when it could not."""
    deadline = time.monotonic() + WRITE_TIMEOUT_S
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("MI FIFO: client at %s does not read its reply; dropped", path)
                return False
            _poll(fd, select.POLLOUT, min(left, 0.1))
            continue
        except OSError as exc:
            log.warning("MI FIFO: writing the reply to %s failed: %s", path, exc.strerror or exc)
            return False
        view = view[written:]
    return True
