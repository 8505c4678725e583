"""The engine contender: events raised through `Engine.raise_event` for
`--duration` s, as fast as the rings take them or paced at `--rate`; in mode
"latency" (the latency phase) every datagram's raise-to-receive time is kept; in
mode "idle" (the idle phase) a quiet period comes first, over which each worker's
CPU is measured, then events at a low rate, each marked when it had to wake a
sleeping worker."""

from __future__ import annotations

import time
from typing import Any, Final

from engine.bench.common import (
    EVENT,
    IP,
    MAX_EVENTS_PER_ROUND,
    PACE_TICK_S,
    SEQ_BASE,
    process_cpu_ns,
)
from engine.bench.receivers import RoundReport
from engine.bench.rounds.skeleton import BenchHost, EngineRound, Window
from engine.shm.counters import LATENCY_BUCKETS_S
from engine.wire import PayloadTooLarge

CHUNK: Final = 64  # raises between two looks at the clock
IDLE_SUBSCRIBERS: Final = 4  # the idle phase's subscribers: the default bench's
IDLE_SETTLE_S: Final = 1.0  # quiet before the idle CPU window (workers sleep after 2 ms)


class ApiRound(EngineRound):
    contender = "engine"

    def __init__(
        self, bench: BenchHost, number: int, rate: float, duration: float, mode: str
    ) -> None:
        self.letter = "i" if mode == "idle" else "r"
        self.mode = mode
        super().__init__(bench, number)
        self.rate = rate
        self.duration = duration
        if mode == "idle":
            self.sockets = self.pool.sockets[:IDLE_SUBSCRIBERS]
        self.quiet: dict[str, Any] | None = None
        self.woke = bytearray()
        self.oversize = 0
        self.others = [p for p in (bench.sender.pid if bench.sender else 0,) if p]

    @property
    def phase(self) -> str:
        return {"latency": "latency phase", "idle": "idle phase"}.get(
            self.mode, f"engine round {self.number}"
        )

    def warm_up(self) -> None:
        if self.mode == "idle":
            self.quiet = self._quiet()

    def feed(self) -> tuple[int, int, int]:
        rate = self.rate
        self.bench.progress.phase = self.phase + (f" at {rate:,.0f} events/s" if rate else "")
        self.bench.scraper.start(self.engine)
        if self.mode == "idle":
            assert self.quiet is not None
            return self._raise_idle(self.quiet.pop("_sleeps_at_start"))
        return self._raise()

    def finish(self, result: dict[str, Any], window: Window, report: RoundReport) -> None:
        super().finish(result, window, report)
        stats = self.stats
        assert stats is not None
        backlog = self.backlog(window)
        result.update(
            oversize=stats.oversize + self.oversize,
            pairs_queued=sum(w.pairs_queued for w in stats.workers),
            pairs_stale=stats.pairs_stale,
            rate_target=self.rate or None,
            drain_s=backlog["drain_s"],
            backlog=backlog,
            metrics_scrapes=self.bench.scraper.round_summary(),
        )
        if self.mode in ("latency", "idle"):
            counts, total_ns = stats.latency_buckets()
            result["engine_raise_to_send"] = {
                "le_s": [*LATENCY_BUCKETS_S, "+Inf"],
                "counts": counts,
                "sum_s": total_ns / 1e9,
            }
            result["_latencies"] = report.latencies_ns
        if self.mode == "idle":
            assert self.quiet is not None
            result["idle_cpu"] = self.quiet
            result["worker_sleeps"] = [w.sleeps for w in stats.workers]
            result["_latency_seqs"] = report.latency_seqs
            result["_woke"] = self.woke

    # -- raising ---------------------------------------------------------------------------
    def _raise(self) -> tuple[int, int, int]:
        """Raise events for the duration, as fast as accepted or paced at the rate.
        Returns (events raised, t0, t_end) (monotonic ns)."""
        raise_event = self.engine.raise_event
        clock = time.monotonic_ns
        rate, tag = self.rate, self.tag
        seq = SEQ_BASE
        n = oversize = 0
        t0 = clock()
        end = t0 + int(self.duration * 1e9)
        while n < MAX_EVENTS_PER_ROUND:
            now = clock()
            if now >= end:
                break
            if rate:
                due = int((now - t0) * rate / 1e9) + 1 - n
                if due <= 0:
                    wait = (t0 + n * 1e9 / rate - now) / 1e9
                    time.sleep(max(wait, PACE_TICK_S))  # never spin: CPUs are shared
                    continue
                count = min(due, CHUNK)
            else:
                count = CHUNK
            for _ in range(count):
                try:
                    raise_event(EVENT, {"tag": tag, "seq": seq, "ip": IP, "t": clock()})
                except PayloadTooLarge:
                    oversize += 1
                seq += 1
            n += count
        self.oversize = oversize
        return n, t0, clock()

    def _raise_idle(self, sleeps_at_quiet: int) -> tuple[int, int, int]:
        """The idle phase's raises: paced at the rate (sleeping between events, never
        spinning). Before each raise, the workers' sleep counts say whether one of them
        went to sleep since the previous raise (for the first: since the quiet period
        began), i.e. whether this event had to wake it: self.woke[i] = 1 for such an
        event. Returns (events raised, t0, t_end)."""
        engine, rate = self.engine, self.rate
        rings = engine.supervisor.rings
        clock = time.monotonic_ns
        woke = self.woke
        n = oversize = 0
        t0 = clock()
        end = t0 + int(self.duration * 1e9)
        last = sleeps_at_quiet
        while n < MAX_EVENTS_PER_ROUND and rate:
            now = clock()
            if now >= end:
                break
            due = t0 + int(n * 1e9 / rate)
            if now < due:
                time.sleep((due - now) / 1e9)
                continue
            sleeps = sum(r.sleeps for r in rings)
            woke.append(1 if sleeps > last else 0)
            last = sleeps
            params = {"tag": self.tag, "seq": SEQ_BASE + n, "ip": IP, "t": clock()}
            try:
                engine.raise_event(EVENT, params)
            except PayloadTooLarge:
                oversize += 1
            n += 1
        self.oversize = oversize
        return n, t0, clock()

    def _quiet(self) -> dict[str, Any]:
        """The idle phase's quiet period: nothing raised for IDLE_SETTLE_S, then for
        --idle-cpu-duration s over which each worker's CPU time is measured."""
        window = self.args.idle_cpu_duration
        progress = self.bench.progress
        progress.phase = "idle phase: quiet"
        rings = self.engine.supervisor.rings
        sleeps_at_start = sum(r.sleeps for r in rings)
        time.sleep(IDLE_SETTLE_S)
        sleeps0 = [r.sleeps for r in rings]
        cpu0 = [process_cpu_ns(pid) for pid in self.worker_pids]
        t0 = time.monotonic_ns()
        if window:
            progress.phase = f"idle phase: measuring idle CPU for {window:g} s"
            time.sleep(window)
        t1 = time.monotonic_ns()
        cpu1 = [process_cpu_ns(pid) for pid in self.worker_pids]
        sleeps1 = [r.sleeps for r in rings]
        cpu_s: dict[str, float | None] = {}
        percent: dict[str, float] = {}
        for k, (a, b) in enumerate(zip(cpu0, cpu1, strict=True)):
            used = None if a is None or b is None else (b - a) / 1e9
            cpu_s[str(k)] = used
            if window and used is not None:
                percent[str(k)] = 100.0 * used * 1e9 / (t1 - t0)
        return {
            "settle_s": IDLE_SETTLE_S,
            "window_s": (t1 - t0) / 1e9 if window else 0.0,
            "cpu_s": cpu_s,
            "percent": percent,
            "sleeps": {str(k): after - sleeps0[k] for k, after in enumerate(sleeps1)},
            "_sleeps_at_start": sleeps_at_start,
        }
