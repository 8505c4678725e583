"""The one shape every bench round has: set up, start the receivers' round, warm up
(what must not be timed: a broker's fill, the idle phase's quiet period), measure
the CPU of every role before and after the timed window, collect what the
receivers saw, tear down (always), then build the round's record (`live.
round_record`: the same keys for every contender, loss told apart) and let the
contender add its own keys.

`Round` is that skeleton; `EngineRound` adds what every round of a real engine
shares (a fresh Engine with its own instance name and every receiver socket
subscribed, the drain, the engine's counters and its own loss); the contenders
are in the sibling modules: api.py (raise_event, also the latency and idle
phases), ingest.py, broker.py (amqp and stream), sender.py (baseline, ceiling).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from engine.bench.common import EVENT, SEQ_BASE, make_tag, peak_rss
from engine.bench.live import (
    Progress,
    Scraper,
    add_engine_loss,
    affinity,
    per,
    round_record,
    send_failures,
    snapshot,
    stop_engine,
    wait_drained,
)
from engine.bench.receivers import ReceiverPool, RoundReport, RoundSpec
from engine.options import EngineOptions
from engine.producer import Engine

if TYPE_CHECKING:
    from engine.bench.baseline import SenderProcess
    from engine.statistics import EngineStatistics

DRAIN_FLOOR_DG_PER_S: Final = 20_000.0  # the slowest drain the time cap allows for
DRAIN_CAP_FLOOR_S: Final = 60.0
BENCH_FULL_RING_WAIT_MS: Final = 1000.0  # engine.full_ring_wait_ms in every engine round


class BenchHost(Protocol):
    """What a round needs of the bench (engine.bench.run.Bench), without importing it."""

    args: argparse.Namespace
    pool: ReceiverPool | None
    sender: SenderProcess | None
    progress: Progress
    scraper: Scraper
    instances: list[str]
    engine: Engine | None
    worker_cpus: list[Any]
    worker_rss: dict[int, int]
    producer_rss: int


@dataclass
class Window:
    """The timed window: first send (or raise) to the last send, in monotonic ns."""

    t0: int
    t_raised: int  # the source stopped raising (or the sender stopped sending)
    t_sent: int  # everything was sent (the rings drained)
    events: int
    sent: int
    failures: dict[str, int] = field(default_factory=dict)


class Round:
    """One round of one contender; `run()` is the skeleton, the hooks are the rest."""

    contender = "?"
    mode = "seq"  # the receivers' RoundSpec mode

    def __init__(self, bench: BenchHost, number: int) -> None:
        self.bench = bench
        self.args = bench.args
        pool = bench.pool
        assert pool is not None
        self.pool = pool
        self.number = number
        self.tag = ""
        self.pids: dict[str, list[int]] = {}
        self.others: list[int] = []

    # -- the hooks -----------------------------------------------------------------------
    def set_up(self) -> None:
        """Start what the round measures; fill self.pids {role: [pid]}."""

    def warm_up(self) -> None:
        """After the receivers' round began, before the CPU is measured."""

    def window(self) -> Window:
        raise NotImplementedError

    def collected(self) -> None:
        """After the receivers reported and the CPU was measured again."""

    def tear_down(self) -> None:
        """Always called: stop and remove what set_up started."""

    def finish(self, result: dict[str, Any], window: Window, report: RoundReport) -> None:
        """Add the contender's own keys to the round's record."""

    # -- the skeleton --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        pool = self.pool
        try:
            self.set_up()
            t0 = time.monotonic_ns()
            self.tag = make_tag(self.args.payload_bytes, t0)
            pool.begin(RoundSpec(self.mode, t0, self.tag, EVENT, SEQ_BASE))
            self.warm_up()
            before = snapshot(self.pids, self.others)
            window = self.window()
            pool.settle(window.sent)
            report = pool.report()
            after = snapshot(self.pids, self.others)
            self.collected()
        finally:
            self.tear_down()
        result = round_record(
            self.number, self.contender, report, before, after, window.t0, window.t_raised,
            window.t_sent, window.events, window.sent, window.failures,
        )  # fmt: skip
        self.finish(result, window, report)
        return result


class EngineRound(Round):
    """A round of a fresh engine fed by some source: the engine's set-up, drain,
    counters and loss are here; the source's are the subclass's (`feed()`)."""

    letter = "r"  # in the instance name: bench<pid><letter><round>

    def __init__(self, bench: BenchHost, number: int) -> None:
        super().__init__(bench, number)
        self.instance = f"bench{os.getpid()}{self.letter}{number}"
        self.options = EngineOptions(
            instance=self.instance,
            workers=self.args.workers,
            full_ring_policy=self.args.full_ring_policy,
            # "wait" here means as fast as the workers send: a worker descheduled for
            # more than the default 10 ms on a busy 2-core machine must not turn the
            # producer's wait into a drop (a stall past this is still one, counted).
            full_ring_wait_ms=BENCH_FULL_RING_WAIT_MS,
            ring_bytes=self.args.ring_bytes,
        )
        self.engine = Engine(self.options, events=[EVENT])
        self.sockets = self.pool.sockets
        self.worker_pids: list[int] = []
        self.pending = 0
        self.stats: EngineStatistics | None = None

    @property
    def phase(self) -> str:
        return f"{self.contender} round {self.number}"

    def set_up(self) -> None:
        bench, engine = self.bench, self.engine
        bench.instances.append(self.instance)
        bench.engine = engine
        bench.progress.phase = f"{self.phase}: starting the engine"
        engine.start()
        for text in self.sockets:
            engine.subscribe(EVENT, text)
        self.worker_pids = [w.pid or 0 for w in engine.statistics().workers]
        bench.worker_cpus = [affinity(pid) for pid in self.worker_pids]
        self.pids = {
            "producer": [os.getpid()],
            "workers": self.worker_pids,
            "receivers": self.pool.pids,
        }

    def feed(self) -> tuple[int, int, int]:
        """Raise the round's events through the source; returns (events, t0, t_raised)."""
        raise NotImplementedError

    def window(self) -> Window:
        events, t0, t_raised = self.feed()
        engine = self.engine
        self.pending = sum(w.pairs_in_ring for w in engine.statistics().workers)
        self.bench.progress.phase = f"{self.phase}: draining {self.pending:,} datagrams"
        duration = float(getattr(self.args, "duration", 0) or 0)
        cap = max(DRAIN_CAP_FLOOR_S, 4 * duration + self.pending / DRAIN_FLOOR_DG_PER_S)
        t_drained = wait_drained(engine, cap)
        self.bench.scraper.stop()
        self.stats = stats = engine.statistics()
        bench = self.bench
        # The producer's peak so far: before the latency samples arrive (the bench's
        # own analysis is not the producer's memory).
        bench.producer_rss = max(bench.producer_rss, peak_rss(os.getpid()) or 0)
        bench.progress.phase = f"{self.phase}: collecting"
        return Window(t0, t_raised, t_drained, events, stats.pairs_sent, send_failures(stats))

    def collected(self) -> None:
        bench = self.bench
        for k, pid in enumerate(self.worker_pids):
            bench.worker_rss[k] = max(bench.worker_rss.get(k, 0), peak_rss(pid) or 0)

    def stop_source(self) -> None:
        """Stop the round's source (before the engine stops)."""

    def tear_down(self) -> None:
        self.bench.scraper.stop()
        self.bench.engine = None
        try:
            self.stop_source()
        finally:
            stop_engine(self.engine, self.instance)

    def finish(self, result: dict[str, Any], window: Window, report: RoundReport) -> None:
        stats = self.stats
        assert stats is not None
        add_engine_loss(result, stats, len(self.sockets))
        cpu = result["cpu_s"]
        result["datagrams_per_sending_cpu_s"] = per(window.sent, cpu["producer"] + cpu["workers"])
        result.update(
            events=window.events,
            events_raised=stats.raised,
            events_queued=stats.events_queued,
            drops=dict(stats.drops),
            identity_errors=stats.identity_errors(),
            subscribed=len(self.sockets),
            worker_pids=self.worker_pids,
        )

    def backlog(self, window: Window) -> dict[str, Any]:
        """The backlog block of an engine round (the engine's bound, what waited)."""
        stats = self.stats
        assert stats is not None
        drain_s = (window.t_sent - window.t_raised) / 1e9
        return {
            "max_pending_datagrams": self.options.max_pending_datagrams,
            "pending_at_end_of_raising": self.pending,
            "peak_pending_sampled": max(self.pending, self.bench.scraper.round_peak_pending),
            "drain_s": drain_s,
            "drain_datagrams_per_s": per(self.pending, drain_s) if self.pending else None,
            "ring_full": stats.drops.get("ring_full", 0),
            "pairs_stale": stats.pairs_stale,
        }
