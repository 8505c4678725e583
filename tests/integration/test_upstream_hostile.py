"""Hostile upstreams (issue 19, items 4 and 5): a fake OpenSIPS MI of our own
(tests/helpers/hostile_mi.py, a process of its own on loopback) that cuts replies short,
answers garbage, trickles, sends 300 MB, answers a UDP request with JSON nested
32,000 deep, lists 2,000 or 10,000 events, or renames its events at every call.

The engine is a real in-process Runner (workers, ingest socket, upstream thread);
its log is captured. Each test checks: the upstream's thread is alive, `up` is
right, the failures are counted by reason and retried, the log stays short, and
(when told to behave, SIGUSR1) the upstream recovers."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import config
from engine.cli.run import Runner
from engine.errors import MIClientError
from engine.mi.client import call
from engine.sources.upstream import Upstream
from engine.statistics import SourceStatistics
from tests.helpers.support import eventually, unique_instance

ROOT = Path(__file__).resolve().parents[2]


class HostileMI:
    """`python -m tests.helpers.hostile_mi MODE EVENTS`, its two targets, SIGUSR1 to behave."""

    def __init__(self, mode: str, events: int = 3) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.hostile_mi", mode, str(events)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()  # bounded: the process prints it or exits
        m = re.fullmatch(r"ready (\S+) (\S+)\n", line)
        assert m, line
        self.http, self.udp = m.group(1), m.group(2)

    def behave(self) -> None:
        self.popen.send_signal(signal.SIGUSR1)

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait(10)


@pytest.fixture
def hostile() -> Iterator[list[HostileMI]]:
    made: list[HostileMI] = []
    yield made
    for mi in made:
        mi.close()


def runner_for(
    tmp_path: Path, mi: str, *, events: str = '["*"]', expire: int = 120, extra: str = ""
) -> Runner:
    text = (
        "events = []\n"
        "[engine]\n"
        f'instance = "{unique_instance("hos")}"\n'
        "workers = 1\npin = false\n"
        f'runtime_dir = "{tmp_path / "rt"}"\n'
        '[mi]\nhttp = ""\ndatagram = ""\n'
        "[state]\nenabled = false\n"
        '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n'
        f'[[upstream]]\nmi = "{mi}"\nevents = {events}\nexpire = {expire}\n{extra}'
    )
    runner = Runner(config.loads(text))
    runner.start()
    return runner


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for r in made:
        r.stop()


def stats(upstream: Upstream) -> SourceStatistics:
    (s,) = upstream.statistics()
    return s


def lines(caplog: pytest.LogCaptureFixture, mi: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if mi in r.getMessage()]


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class RssPeak:
    """The highest RSS of this process while it runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.start = self.peak = rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib())

    def growth_mib(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return (self.peak - self.start) / 1024


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("truncated", "bad_reply"),
        ("garbage", "bad_reply"),
        ("trickle", "timeout"),
        ("huge", "too_large"),
        ("huge_chunked", "too_large"),
        ("udp_garbage", "bad_reply"),
    ],
)
def test_a_broken_upstream_is_counted_retried_and_recovers(
    tmp_path: Path,
    hostile: list[HostileMI],
    runners: list[Runner],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, "event_datagram")
    mi = HostileMI(mode)
    hostile.append(mi)
    target = mi.udp if mode.startswith("udp_") else mi.http
    rss = RssPeak()
    runner = runner_for(tmp_path, target)
    runners.append(runner)
    (upstream,) = runner.upstreams
    # Failed, counted by reason, and retried (a second failure, after the back-off).
    eventually(lambda: stats(upstream).errors[reason] >= 3, 30, f"three {reason} failures")
    growth = rss.growth_mib()
    s = stats(upstream)
    assert upstream.guard.alive
    assert (s.up, s.events) == (0, 0)
    assert s.errors["internal"] == s.errors["thread_died"] == 0
    said = lines(caplog, target)
    assert len(said) == 1 and ": down: " in said[0], said  # once, not per retry
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert growth < 20, f"RSS grew {growth:.1f} MiB"
    # Told to behave: subscribed at the next retry (the back-off is 10 s at most).
    mi.behave()
    eventually(lambda: (stats(upstream).up, stats(upstream).events) == (1, 3), 30, "up")
    assert runner.ingest is not None
    assert call(target, "subscribers_list", ["E_HOSTILE_1", runner.ingest.names[0]])
    said = lines(caplog, target)
    assert len(said) == 2 and " subscribed " in said[1], said


@pytest.mark.parametrize("events", [2000, 10000])
def test_more_events_than_fit_are_one_summary_line_and_not_up(
    tmp_path: Path,
    hostile: list[HostileMI],
    runners: list[Runner],
    caplog: pytest.LogCaptureFixture,
    events: int,
) -> None:
    caplog.set_level(logging.INFO, "event_datagram")
    mi = HostileMI("good", events)
    hostile.append(mi)
    runner = runner_for(tmp_path, mi.http, expire=6)  # refreshed every 2 s
    runners.append(runner)
    (upstream,) = runner.upstreams
    eventually(lambda: stats(upstream).events == 256, 30, "256 events subscribed")
    # Three refreshes later: each re-read the list and refused the same events again.
    eventually(lambda: upstream.rounds >= 4, 60, "three refreshes")
    s = stats(upstream)
    assert upstream.guard.alive
    assert (s.up, s.events, s.refused) == (0, 256, events - 256)
    said = lines(caplog, mi.http)
    refused = [x for x in said if "refused" in x]
    assert refused == [
        f"upstream {mi.http}: refused {events - 256:,} of {events:,} event(s): more than "
        "engine.max_events (256) (e.g. E_HOSTILE_256, E_HOSTILE_257, E_HOSTILE_258); "
        "not taken (up stays 0)"
    ]
    assert len(said) == 2, said  # that line and "subscribed ... 256 event(s)"


def test_max_reply_bytes_is_the_upstreams_limit(
    tmp_path: Path, hostile: list[HostileMI], runners: list[Runner]
) -> None:
    """upstream.max_reply_bytes = 4096: an events_list of 2,000 events (about 70 KB)
    is refused, counted too_large; the upstream is down and keeps retrying."""
    mi = HostileMI("good", 2000)
    hostile.append(mi)
    runner = runner_for(tmp_path, mi.http, extra="max_reply_bytes = 4096\n")
    runners.append(runner)
    (upstream,) = runner.upstreams
    eventually(lambda: stats(upstream).errors["too_large"] >= 2, 30, "two too_large")
    assert (stats(upstream).up, stats(upstream).events) == (0, 0) and upstream.guard.alive


def test_an_upstream_that_renames_its_events_at_every_call(
    tmp_path: Path,
    hostile: list[HostileMI],
    runners: list[Runner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "event_datagram")
    mi = HostileMI("renaming", 300)
    hostile.append(mi)
    runner = runner_for(tmp_path, mi.udp, expire=6)  # refreshed every 2 s
    runners.append(runner)
    (upstream,) = runner.upstreams
    eventually(lambda: upstream.rounds >= 5, 60, "five rounds")
    s = stats(upstream)
    assert upstream.guard.alive
    assert s.up == 0 and s.refused == 300  # no slot left for the new names
    with runner.engine.lock:
        assert len(runner.engine.registry.events()) == 256
    said = lines(caplog, mi.udp)
    assert len(said) <= 4, said  # first round, then the new names: not a line per name
    assert len([x for x in said if "refused" in x]) == 2, said


def test_the_client_keeps_a_whole_call_deadline_and_a_size_limit(
    hostile: list[HostileMI],
) -> None:
    """The MI client itself: each hostile answer is an MIClientError with a reason,
    within the deadline, with memory bounded (a call in a thread, so that a client
    that hangs fails the test instead of hanging it)."""
    cases = {
        "truncated": "bad_reply",
        "garbage": "bad_reply",
        "trickle": "timeout",
        "huge": "too_large",
        "huge_chunked": "too_large",
        "udp_garbage": "bad_reply",
    }
    for mode, reason in cases.items():
        mi = HostileMI(mode)
        hostile.append(mi)
        target = mi.udp if mode.startswith("udp_") else mi.http
        for _ in range(4 if mode == "udp_garbage" else 1):  # each kind of UDP garbage
            outcome: list[BaseException | object] = []

            def one(target: str = target, outcome: list[BaseException | object] = outcome) -> None:
                try:
                    outcome.append(call(target, "events_list", timeout=1.0, max_reply=1 << 20))
                except BaseException as err:  # the test reports it
                    outcome.append(err)

            rss = RssPeak()
            thread = threading.Thread(target=one, daemon=True)
            thread.start()
            thread.join(20)
            assert not thread.is_alive(), f"{mode}: the call did not end"
            assert rss.growth_mib() < 20, mode
            (exc,) = outcome
            assert isinstance(exc, MIClientError), (mode, exc)
            assert exc.reason == reason, (mode, exc)


def test_the_client_reads_chunked_replies_after_an_interim_answer(
    hostile: list[HostileMI],
) -> None:
    """The HTTP forms a real server may use: 100 Continue first, chunked bodies with
    chunk extensions and a trailer; and the size limit counts the decoded body."""
    mi = HostileMI("chunked", 3)
    hostile.append(mi)
    result = call(mi.http, "events_list", timeout=5.0)
    assert [e["name"] for e in result["Events"]] == [f"E_HOSTILE_{i}" for i in range(3)]
    with pytest.raises(MIClientError) as err:
        call(mi.http, "events_list", timeout=5.0, max_reply=64)
    assert err.value.reason == "too_large"
