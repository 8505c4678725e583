"""[[upstream]]: engine B subscribes its ingest socket at engine A's MI (A stands in
for an OpenSIPS: the same MI commands and replies), with real processes.

A is always `python -m engine run` (MI datagram on a fixed free port, so it can be
restarted on it; state off; no static subscriptions). B is another `run` process,
or an in-process Runner where a test reads its statistics or times its stop."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from engine import config
from engine.cli.run import Runner
from engine.errors import MIClientError, MIReplyError
from engine.metrics import exposition
from engine.mi.client import call
from engine.sources import upstream as upstream_mod
from tests.helpers.mi import Proc, processes
from tests.helpers.support import Receiver, udp_receiver, unique_instance

HEAL_S = 5.0  # an upstream restart is healed within this (SPEC section 8)


class Run(Proc):
    """`python -m engine run --config CFG`, waited for until ready (or not, wait=False)."""

    def __init__(self, cfg: Path, *extra: str, wait: bool = True) -> None:
        self.started = time.monotonic()
        super().__init__([sys.executable, "-m", "engine", "run", "--config", str(cfg), *extra])
        self.ready = ""
        self.ready_after = 0.0
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> str:
        self.ready = self.wait_err(r"event-datagram ready: (.*)", timeout).group(1)
        self.ready_after = time.monotonic() - self.started
        return self.ready

    @property
    def mi(self) -> str:
        m = re.search(r"mi datagram (udp:\S+?),", self.ready)
        assert m, self.ready
        return m.group(1)

    @property
    def ingest(self) -> str:
        m = re.search(r"ingest (\S+?),", self.ready)
        assert m, self.ready
        return m.group(1)

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.stderr))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def engine_toml(tmp_path: Path, tag: str, events: list[str], mi_port: int = 0) -> str:
    return (
        f"events = {json.dumps(events)}\n"
        "[engine]\n"
        f'instance = "{unique_instance(tag)}"\n'
        "workers = 1\n"
        "pin = false\n"
        f'runtime_dir = "{tmp_path / ("rt-" + tag)}"\n'
        "[mi]\n"
        'http = ""\n'
        f'datagram = "127.0.0.1:{mi_port}"\n'
        "[state]\n"
        "enabled = false\n"
    )


def a_config(tmp_path: Path, port: int, events: list[str]) -> Path:
    path = tmp_path / "a.toml"
    path.write_text(engine_toml(tmp_path, "upa", events, port))
    return path


def b_toml(tmp_path: Path, upstreams: list[tuple[str, list[str]]], expire: int = 120) -> str:
    text = engine_toml(tmp_path, "upb", []) + '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n'
    for mi, events in upstreams:
        text += f'[[upstream]]\nmi = "{mi}"\nevents = {json.dumps(events)}\nexpire = {expire}\n'
    return text


def b_config(tmp_path: Path, upstreams: list[tuple[str, list[str]]]) -> Path:
    path = tmp_path / "b.toml"
    path.write_text(b_toml(tmp_path, upstreams))
    return path


def listed(mi: str, event: str, sock: str) -> bool:
    """Does `mi`'s subscribers_list show `sock` subscribed to `event`?"""
    try:
        result = call(mi, "subscribers_list", [event, sock], timeout=1.0)
    except MIReplyError as exc:
        if exc.code == 404:
            return False
        raise
    except MIClientError:
        return False
    return bool(result["Event"]["Subscriber"]["socket"] == sock)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` every 20 ms; return the seconds it took to hold."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    with processes() as started:
        yield started


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def test_chain_relays_the_upstreams_bytes_and_unsubscribes_on_stop(
    tmp_path: Path, procs: list[Proc], receivers: list[Receiver]
) -> None:
    """(1) B subscribes its ingest at A; what A raises reaches B's subscriber with A's
    exact bytes. (3) B stopped: its subscription is gone from A's listing."""
    port = free_udp_port()
    a = Run(a_config(tmp_path, port, ["E_UP", "E_OTHER"]))
    procs.append(a)
    b = Run(b_config(tmp_path, [(a.mi, ["E_UP"])]))
    procs.append(b)
    assert f"upstream {a.mi}" in b.ready
    subscribed_in = wait_until(lambda: listed(a.mi, "E_UP", b.ingest), 5, "B listed at A")
    assert not listed(a.mi, "E_OTHER", b.ingest)  # only the events named
    assert b.count(r"upstream \S+: subscribed") == 1

    direct, relayed = udp_receiver(), udp_receiver()
    receivers += [direct, relayed]
    assert call(a.mi, "event_subscribe", ["E_UP", direct.socket_text, 60]) == "OK"
    assert call(b.mi, "event_subscribe", ["E_UP", relayed.socket_text, 60]) == "OK"
    params = '{"ip":"192.168.2.11","n":7,"x":1.5e3,"s":"caf\\u00e9 \\"q\\"","l":[true,null]}'
    assert call(a.mi, "raise_event", ["E_UP", params]) == "OK"
    assert call(a.mi, "raise_event", ["E_UP", [1, "two", {"3": 4}]]) == "OK"
    sent = direct.wait_for(2)
    assert len(sent) == 2, sent
    assert relayed.wait_for(2) == sent  # byte for byte, in order
    assert sent[0].startswith(b'{"jsonrpc":"2.0","method":"E_UP","params":{"ip":"192.168.2.11"')

    stop_started = time.monotonic()
    assert b.stop() == 0, b.stderr
    stopped_in = time.monotonic() - stop_started
    assert not listed(a.mi, "E_UP", b.ingest)
    with pytest.raises(MIReplyError) as err:
        call(a.mi, "subscribers_list", ["E_UP", b.ingest], timeout=1.0)
    assert (err.value.code, err.value.message) == (404, "Subscriber does not exist")
    assert b.count(r"unsubscribed \S+ from 1 event") == 1
    assert "Traceback" not in b.stderr + a.stderr
    print(f"subscribed {subscribed_in:.3f} s after B's ready line; B stopped in {stopped_in:.2f} s")


def test_an_upstream_restart_is_healed_within_5_s(
    tmp_path: Path, procs: list[Proc], receivers: list[Receiver]
) -> None:
    """(2) A restarted (no state file: it forgets every subscription): B is listed
    at A again within 5 s of A's ready line, and events flow again."""
    port = free_udp_port()
    cfg_a = a_config(tmp_path, port, ["E_UP"])
    a = Run(cfg_a)
    procs.append(a)
    b = Run(b_config(tmp_path, [(a.mi, ["E_UP"])]))
    procs.append(b)
    wait_until(lambda: listed(a.mi, "E_UP", b.ingest), 5, "B listed at A")
    relayed = udp_receiver()
    receivers.append(relayed)
    assert call(b.mi, "event_subscribe", ["E_UP", relayed.socket_text, 60]) == "OK"

    delays = []
    for round_ in range(2):
        assert a.stop() == 0, a.stderr
        if round_ == 1:
            time.sleep(2.5)  # long enough for B to find A down (a check, then retries)
        a = Run(cfg_a)
        procs.append(a)
        back = partial(listed, a.mi, "E_UP", b.ingest)
        delays.append(wait_until(back, HEAL_S, "re-listed"))
        assert call(a.mi, "raise_event", ["E_UP", f'{{"round":{round_}}}']) == "OK"
        assert len(relayed.wait_for(round_ + 1)) == round_ + 1
    # Forgotten without a restart (A answers throughout: the check's 404 path).
    assert call(a.mi, "event_subscribe", ["E_UP", b.ingest, 0]) == "OK"
    assert not listed(a.mi, "E_UP", b.ingest)
    forgotten = wait_until(partial(listed, a.mi, "E_UP", b.ingest), HEAL_S, "re-listed")
    assert b.count(r"upstream \S+: \S+ is no longer subscribed to E_UP") >= 1, b.stderr
    # A lists B as soon as it answers B; B logs once it has read that answer.
    wait_until(lambda: b.count(r"upstream \S+: resubscribed") >= 3, 5, "the third log line")
    time.sleep(0.3)  # ...and no fourth one
    assert b.count(r"upstream \S+: resubscribed") == 3, b.stderr
    assert b.count(r"upstream \S+: down") <= 2, b.stderr  # once per outage, not per retry
    print(
        f"re-listed at A {delays[0]:.2f} s / {delays[1]:.2f} s after A's ready line, "
        f"{forgotten:.2f} s after A forgot it"
    )


def test_an_upstream_that_is_down_delays_nothing(tmp_path: Path, procs: list[Proc]) -> None:
    """(4) A down when B starts (and a second upstream that never answers at all):
    B is ready at once, and subscribes at A within a retry of A appearing."""
    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes requests, answers none: each call times out
        silent_mi = f"udp:127.0.0.1:{silent.getsockname()[1]}"
        a_mi = f"udp:127.0.0.1:{port}"
        b = Run(b_config(tmp_path, [(a_mi, ["E_UP"]), (silent_mi, ["E_UP"])]))
        procs.append(b)
        assert f"upstream {a_mi} {silent_mi}" in b.ready
        time.sleep(3)  # a few retries against both
        # The ready line came before the silent MI's first call had timed out (1 s).
        lines = b.stderr.splitlines()
        ready_at = next(i for i, line in enumerate(lines) if "event-datagram ready" in line)
        silent_at = next(i for i, line in enumerate(lines) if f"{silent_mi}: down" in line)
        assert ready_at < silent_at, b.stderr
        assert b.ready_after < 10, b.ready_after
        assert b.count(rf"upstream {a_mi}: down") == 1, b.stderr  # not one per retry
        assert b.count(rf"upstream {silent_mi}: down") == 1, b.stderr
        a = Run(a_config(tmp_path, port, ["E_UP"]))
        procs.append(a)
        after = wait_until(lambda: listed(a_mi, "E_UP", b.ingest), HEAL_S, "B listed at A")
        stop_started = time.monotonic()
        assert b.stop() == 0, b.stderr
        stopped_in = time.monotonic() - stop_started
    assert not listed(a_mi, "E_UP", b.ingest)
    assert b.count(rf"upstream {a_mi}: subscribed") == 1
    print(
        f"B ready {b.ready_after:.2f} s after it started; listed at A {after:.2f} s after "
        f"A's ready line; B stopped in {stopped_in:.2f} s"
    )


def test_all_events_of_the_upstream(tmp_path: Path, procs: list[Proc]) -> None:
    """(5) --upstream MI (events ["*"]): every event of A's events_list is registered
    at B and subscribed at A."""
    names = ["E_ONE", "E_TWO", "E_THREE", "E_CORE_THRESHOLD"]
    port = free_udp_port()
    a = Run(a_config(tmp_path, port, names))
    procs.append(a)
    path = tmp_path / "b.toml"
    path.write_text(engine_toml(tmp_path, "upb", ["E_LOCAL"]))
    b = Run(path, "--ingest", "udp:127.0.0.1:0", "--upstream", a.mi)
    procs.append(b)
    for name in names:
        wait_until(partial(listed, a.mi, name, b.ingest), 5, f"B listed at A for {name}")
    at_b = {e["name"] for e in call(b.mi, "events_list", [])["Events"]}
    assert at_b == {*names, "E_LOCAL"}
    assert b.stop() == 0, b.stderr
    assert not any(listed(a.mi, n, b.ingest) for n in names)
    assert b.count(r"unsubscribed \S+ from 4 event") == 1


def test_statistics_and_a_frozen_upstream_at_stop(tmp_path: Path, procs: list[Proc]) -> None:
    """An in-process B: its upstream's statistics (up, events, errors by reason), and
    its stop with an upstream that holds its socket but answers nothing (SIGSTOP):
    the upstreams' part of the stop takes about a second, not a timeout per event."""
    port = free_udp_port()
    names = ["E_ONE", "E_TWO", "E_THREE"]
    a = Run(a_config(tmp_path, port, names))
    procs.append(a)
    cfg = config.loads(b_toml(tmp_path, [(a.mi, ["*"])]))
    runner = Runner(cfg)
    runner.start()
    try:
        assert runner.ingest is not None
        ingest = runner.ingest.names[0]

        def upstream_stats() -> tuple[int | None, int, dict[str, int]]:
            (s,) = [s for s in runner.engine.statistics().sources if s.kind == "upstream"]
            assert (s.name, s.received, s.raised) == (a.mi, 0, 0)
            return s.up, s.events, s.errors

        wait_until(lambda: upstream_stats()[:2] == (1, 3), 5, "up with 3 events")
        assert upstream_stats()[2] == dict.fromkeys(upstream_mod.ERROR_REASONS, 0)
        assert all(listed(a.mi, n, ingest) for n in names)
        with runner.engine.lock:
            assert {n for n, _ in runner.engine.registry.events()} == set(names)
        text = exposition(runner.engine)[0].decode()
        label = f'mi="{a.mi}"'
        assert f"event_datagram_upstream_up{{{label}}} 1.0" in text
        assert f"event_datagram_upstream_subscribed_events{{{label}}} 3.0" in text
        assert f'event_datagram_upstream_errors_total{{{label},reason="unreachable"}} 0.0' in text
        runner.engine.statistics().check_identity()

        a.popen.send_signal(signal.SIGSTOP)
        try:
            # A check times out: down, counted "timeout".
            wait_until(lambda: upstream_stats()[0] == 0, 6, "down")
            assert upstream_stats()[2]["timeout"] >= 1
            stop_started = time.monotonic()
            upstream_mod.stop_all(runner.upstreams)
            stopped_in = time.monotonic() - stop_started
            runner.upstreams = []
        finally:
            a.popen.send_signal(signal.SIGCONT)
    finally:
        runner.stop()
    assert stopped_in < upstream_mod.STOP_BUDGET + upstream_mod.CALL_TIMEOUT + 0.3, stopped_in
    print(f"upstreams stopped in {stopped_in:.2f} s with a frozen upstream")
