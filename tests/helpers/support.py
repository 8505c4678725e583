"""Shared test helpers: real receivers on loopback/UNIX sockets, engines, vectors."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.options import EngineOptions
from engine.producer import Engine
from engine.shm.segment import list_segments
from engine.subscriptions import AllowList

REPO = Path(__file__).resolve().parents[2]  # the checkout: README.md, docs/, grafana/, tests/
VECTORS = REPO / "tests" / "vectors" / "opensips"  # data, kept byte-identical
_counter = itertools.count()
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


RING_CAPACITY = 4096  # the `ring` fixture's: the smallest ring, full after a few records


class Clock:
    """A settable clock for code that takes one (`clock=`): call it for the time."""

    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def vectors_dir() -> Path:
    if not VECTORS.is_dir():
        raise FileNotFoundError(f"test vectors not found at {VECTORS}")
    return VECTORS


def load_vector(name: str, *, missing_ok: bool = False) -> Any:
    """The one loader of tests/vectors/opensips: the JSON file `name`, decoded (None
    when it is missing and `missing_ok`; else FileNotFoundError)."""
    path = VECTORS / name
    if missing_ok and not path.is_file():
        return None
    return json.loads(vectors_dir().joinpath(name).read_text(encoding="utf-8"))


def unique_instance(tag: str = "t") -> str:
    return f"{tag}{os.getpid()}x{next(_counter)}"


class Receiver:
    """A bound datagram socket whose datagrams a thread collects, in arrival order."""

    def __init__(self, family: int, address: str | tuple[str, int], rcvbuf: int = 64 << 20) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:  # as root, past net.core.rmem_max: bursts must not overflow the receiver
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.family = family
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def socket_text(self) -> str:
        """The subscriber socket string for this receiver."""
        name = self.sock.getsockname()
        if self.family == socket.AF_UNIX:
            return f"unix:{name}"
        if self.family == socket.AF_INET6:
            return f"udp:[{name[0]}]:{name[1]}"
        return f"udp:{name[0]}:{name[1]}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(70000)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.datagrams.append(data)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.datagrams) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return list(self.datagrams)

    def quiet(self, expect: int = 0, settle: float = 0.3, timeout: float = 20.0) -> list[bytes]:
        """Wait for at least `expect` datagrams (bounded by `timeout`: the machine may
        be busy), then until nothing new arrives for `settle` seconds; return all."""
        self.wait_for(expect, timeout)
        seen = -1
        while seen != len(self.datagrams):
            seen = len(self.datagrams)
            time.sleep(settle)
        return list(self.datagrams)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        path = self.sock.getsockname() if self.family == socket.AF_UNIX else None
        self.sock.close()
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def udp_receiver(host: str = "127.0.0.1") -> Receiver:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return Receiver(family, (host, 0))


def unix_receiver(directory: Path, name: str = "rx.sock") -> Receiver:
    return Receiver(socket.AF_UNIX, str(directory / name))


@contextmanager
def running_engine(
    events: Sequence[str] | None = None,
    *,
    static: Sequence[tuple[str, str]] = (),
    allow: AllowList | None = None,
    state_file: str | None = None,
    **options: Any,
) -> Iterator[Engine]:
    """The tests' one engine factory: an Engine for `events` (default E_TEST) with
    EngineOptions(**options) and a unique instance name (unless `instance` is
    given), the `static` (event, socket) subscriptions made before it starts,
    started; stopped afterwards, and checked to leave no shared memory behind.

    conftest.py exposes it as the `make_engine` fixture and as the module-scoped
    `engine` fixture."""
    options.setdefault("instance", unique_instance())
    opts = EngineOptions(**options)
    engine = Engine(opts, events=list(events or ["E_TEST"]), allow=allow, state_file=state_file)
    for event, socket_text in static:
        engine.subscribe(event, socket_text, None)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()
        leftover = list_segments(opts.instance)
        assert not leftover, f"shared-memory segments left behind: {leftover}"


def settle(engine: Engine, timeout: float = 10.0) -> None:
    """Wait until every worker has consumed everything in its ring."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.statistics()
        if all(w.ring.used_bytes == 0 for w in stats.workers):
            return
        time.sleep(0.005)
    raise AssertionError("workers did not drain their rings in time")


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
