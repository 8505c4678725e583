"""Helpers for the MI, server and CLI tests: the events and static subscription
of the captured OpenSIPS sessions, the vectors and their replay, and real
`event-datagram` processes. (Engines come from tests.helpers.support.running_engine.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.address import AddressError, parse_destination
from engine.mi.dispatch import handle
from engine.producer import Engine
from tests.helpers.support import load_vector

# The events of the captured sessions, in OpenSIPS's id order.
CORE_EVENTS = [
    "E_CORE_SR_STATUS_CHANGED",
    "E_CORE_THRESHOLD",
    "E_CORE_SHM_THRESHOLD",
    "E_CORE_PKG_THRESHOLD",
    "E_CORE_PROC_AUTO_SCALE",
    "E_CORE_TCP_DISCONNECT",
    "E_PROFILING_SCRIPT",
    "E_PROFILING_PROC",
]
MI_EVENTS = [*CORE_EVENTS, "E_BENCH", "E_SAMPLE", "E_STARTUP_SUB", "E_CORE_LOG"]
NAMES_EVENTS = [*CORE_EVENTS, "E_BENCH", "E_SAMPLE", "E_PIKE_BLOCKED", "E_CORE_LOG"]
STATIC = "udp:127.0.0.1:9999"
ONE_WORKER = {"workers": 1, "pin": False}  # the MI tests' engines: running_engine(**ONE_WORKER)

# The transport tests' probe: an engine with E_SAMPLE and E_BENCH, and its events_list.
EVENTS_REQUEST = b'{"jsonrpc":"2.0","id":"1","method":"events_list"}'
EVENTS_REPLY = (
    b'{"jsonrpc":"2.0","result":{"Events":[{"name":"E_SAMPLE","id":0},'
    b'{"name":"E_BENCH","id":1}]},"id":"1"}'
)

EXE = str(Path(sys.executable).with_name("event-datagram"))


def vectors(name: str) -> Any:
    return load_vector(name)


def mi(engine: Engine, request: str | bytes | dict[str, Any]) -> bytes | None:
    if isinstance(request, dict):
        request = json.dumps(request)
    if isinstance(request, str):
        request = request.encode()
    return handle(engine, request)


def no_ttl(reply: bytes | str | None) -> str | None:
    """Replace ttl numbers (they depend on elapsed time) by a placeholder."""
    if reply is None:
        return None
    text = reply.decode() if isinstance(reply, bytes) else reply
    return re.sub(r'"ttl":\d+', '"ttl":N', text)


def check_ttls(reply: bytes | None) -> None:
    """Every numeric ttl is 1..expire (time-dependent fields are compared structurally)."""
    assert reply is not None
    for expire, ttl in re.findall(rb'"expire":(\d+),"ttl":(\d+)', reply):
        assert 0 < int(ttl) <= int(expire), reply


# -- mi.json, replayed through any transport (in process, or a real process's MI) ------------

# Replies of the captured sessions (mi.json's "id":"1").
OK = '{"jsonrpc":"2.0","result":"OK","id":"1"}'
BAD_VALUE = '{"jsonrpc":"2.0","error":{"code":400,"message":"Bad parameter value"},"id":"1"}'
NO_SUBSCRIBER = (
    '{"jsonrpc":"2.0","error":{"code":404,"message":"Subscriber does not exist"},"id":"1"}'
)
PARSE_ERROR = '{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'


def _resolves(socket: str) -> bool:
    try:
        parse_destination(socket)
    except AddressError:
        return False
    return True


def _subs(entries: list[tuple[str, int]]) -> str:
    return ",".join(f'{{"socket":"{s}","expire":{e},"ttl":N}}' for s, e in entries)


def _event(entries: list[tuple[str, int]], name: str = "E_SAMPLE", eid: int = 9) -> str:
    inner = f'{{"name":"{name}","id":{eid},"Subscribers":[{_subs(entries)}]}}'
    return f'{{"jsonrpc":"2.0","result":{{"Event":{inner}}},"id":"1"}}'


def _our_mi_json() -> dict[str, str]:
    """Our replies where mi.json shows an OpenSIPS quirk (docs/mi.md: deliberate differences)."""
    ip6 = _resolves("udp:ip6-localhost:9000")  # the capture's host could not resolve it
    sample = [
        *([("udp:ip6-localhost:9000", 60)] if ip6 else []),
        ("udp:localhost:9000", 60),
        ("udp:[::1]:9000", 60),  # IPv6 supported
        ("unix:/tmp/ev_bare.sock", 60),  # "unix:" is optional
        # udp:127.0.0.1:70000 rejected (no wrap to 4464); unix:rel.sock rejected (relative)
        ("udp:127.0.0.1:65535", 60),
        ("udp:127.0.0.1:9003", 30),
        ("unix:/tmp/ev_mi_test.sock", 3600),
        ("udp:127.0.0.1:9002", 3600),
        ("udp:127.0.0.1:9001", 60),
    ]
    startup = (
        '{"name":"E_STARTUP_SUB","id":10,"Subscribers":'
        '[{"socket":"udp:127.0.0.1:9999","expire":"never"}]}'
    )
    all_events = (
        '{"jsonrpc":"2.0","result":{"Events":[{"name":"E_SAMPLE","id":9,"Subscribers":['
        + _subs([*sample, ("udp:127.0.0.1:9000", 120)])
        + "]},"
        + startup
        + ']},"id":"1"}'
    )
    with_9010 = [("udp:127.0.0.1:9010", 2), *sample]  # 9000 left at once with expire 0
    return {
        "subscribe bad/odd socket: port 70000": BAD_VALUE,
        "subscribe bad/odd socket: bare path no unix: prefix": OK,
        "subscribe bad/odd socket: unix relative path": BAD_VALUE,
        "subscribe bad/odd socket: ipv6 bracketed": OK,
        "subscribe bad/odd socket: hostname ip6-localhost (/etc/hosts ::1)": OK
        if ip6
        else BAD_VALUE,
        "subscribers_list all after odd sockets": all_events,
        # exact matching: unix:/tmp/evA is a subscriber of its own, /tmp/evAB keeps expire 60
        "subscribers_list E_BENCH after prefix test": _event(
            [("unix:/tmp/evA", 30), ("unix:/tmp/evAB", 60)], "E_BENCH", 8
        ),
        "subscribers_list E_BENCH, socket unix:/tmp/evA": (
            '{"jsonrpc":"2.0","result":{"Event":{"name":"E_BENCH","id":8,"Subscriber":'
            '{"socket":"unix:/tmp/evA","expire":30,"ttl":N}}},"id":"1"}'
        ),
        "subscribers_list E_SAMPLE right after expire 0": _event(with_9010),
        "subscribers_list E_SAMPLE/9000 right after expire 0": NO_SUBSCRIBER,
        "subscribers_list E_SAMPLE ~1s later": _event(with_9010),
        "subscribers_list E_SAMPLE ~3s later": _event(sample),
        # invalid JSON: a JSON-RPC error instead of a plain-text "400 Parse_error"
        "invalid json": PARSE_ERROR,
    }


def replay_mi_json(send: Callable[[bytes], bytes | None]) -> None:
    """Send every mi.json request in order through ``send``; check every reply.

    The engine behind ``send`` must be set up like the capture: MI_EVENTS and
    E_STARTUP_SUB statically subscribed on udp:127.0.0.1:9999.
    """
    ours = _our_mi_json()
    cases = vectors("mi.json")
    labels = [c["label"] for c in cases]
    assert set(ours) <= set(labels), set(ours) - set(labels)
    marks: dict[str, float] = {}
    for case in cases:
        label = case["label"]
        # Wait where the capture waited, so the same subscribers have expired.
        if label == "subscribers_list all after odd sockets":
            _sleep_until(marks["9004"] + 1.1)  # expire 1.5 -> 1 s
        elif label == "subscribers_list E_SAMPLE ~1s later":
            _sleep_until(marks["9010"] + 1.0)
        elif label == "subscribers_list E_SAMPLE ~3s later":
            _sleep_until(marks["9010"] + 2.1)  # expire 2
        got = send(case["request"].encode())
        if label == "subscribe expire float":
            marks["9004"] = time.time()
        elif label == "subscribe E_SAMPLE udp 9010 expire 2 (new)":
            marks["9010"] = time.time()
        want = ours.get(label, case["reply"])
        assert no_ttl(got) == no_ttl(want), label
        if got is not None and b'"ttl"' in got:
            check_ttls(got)


def _sleep_until(instant: float) -> None:
    time.sleep(max(0.0, instant - time.time()))


# -- real processes -------------------------------------------------------------------------


class Proc:
    """A subprocess whose stdout and stderr are collected line by line by threads."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, new_session: bool = False
    ) -> None:
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=new_session,  # a process group of its own, to signal whole
        )
        self.out: list[bytes] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.out, False)),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.err, True)),
        ]
        for t in self._threads:
            t.daemon = True
            t.start()

    @staticmethod
    def _pump(stream: Any, sink: list[Any], text: bool) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line.decode(errors="replace") if text else line)

    def wait_err(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.err):
                m = rx.search(line)
                if m:
                    return m
            if self.popen.poll() is not None:
                time.sleep(0.1)  # let the pump threads finish
                for line in list(self.err):
                    if m := rx.search(line):
                        return m
                raise AssertionError(
                    f"{self.args[1:3]} exited {self.popen.returncode}: {self.stderr}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} on stderr in {timeout} s: {self.stderr}")

    def wait_out(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.out) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            raise AssertionError(f"{self.args[1:3]} did not stop in {timeout} s") from None
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collects Procs; kills whatever still runs at the end, even on failure."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.kill()


class RunProc(Proc):
    """`event-datagram run`, started and waited for until it is ready."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, new_session: bool = False
    ) -> None:
        super().__init__([EXE, "run", *args], env=env, new_session=new_session)
        ready = self.wait_err(r"event-datagram ready: (.*)")
        self.ready = ready.group(1)
        http = re.search(r"mi (http://\S+/mi)", self.ready)
        udp = re.search(r"mi datagram (udp:\S+?),", self.ready)
        fifo = re.search(r"mi fifo (\S+?),", self.ready)
        self.http = http.group(1) if http else None
        self.udp = udp.group(1) if udp else None
        self.fifo = fifo.group(1) if fifo else None


def client(
    *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run one `event-datagram` client verb to completion."""
    return subprocess.run(
        [EXE, *args],
        capture_output=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
