"""The bench run: receivers and the reference sender started once, then the
interleaved rounds (engine, ingest, baseline, ceiling, as --source asks), the
latency phase and the idle phase.

An engine round starts a fresh `Engine` (unique instance name, so its shared
memory is easy to find and remove), subscribes every receiver socket, raises
events through `Engine.raise_event` for `--duration` seconds (as fast as the
rings take them, or paced at `--rate`), waits until the workers have sent
everything in their rings, and stops the engine. Every wait is bounded: the
drain waits while the workers make progress (a backlog of 1,000-subscriber
events takes a while), not past a stall.

An ingest round (`--source ingest|both`) is an engine round fed through a
datagram ingest socket (`udp:127.0.0.1:0`, `sources.ingest.Ingest`, read by its
thread in this process) instead of `Engine.raise_event`: the sender process emits
the E_BENCH notifications to it with sendmmsg (`baseline.run_ingest`) for
`--duration` s, as fast as it can or at `--ingest-rate` (default `--rate`); the
bench then waits until the ingest socket is read out, sends it one probe (a
notification of an unknown event, rejected `unknown_event`: the kernel reports its
drops at the socket with the next datagram read, so the probe makes the last of
them known), drains the workers and checks the same receivers and the accounting
identity (the ingest socket's included). The probe is not counted among the
events ingested. With `--emitter-sched idle` the emitter runs under SCHED_IDLE:
as fast as it can, on CPU time the engine's processes leave (at normal priority a
full-speed emitter on a worker's core takes about half of that core).

The idle phase is an engine round with a quiet period first: a fresh engine,
the first IDLE_SUBSCRIBERS subscriber sockets, nothing raised for IDLE_SETTLE_S
(the workers go to sleep engine.idle_poll_ms after their last record) and then
for `--idle-cpu-duration` s, over which each worker's CPU time is measured; then
events at `--idle-latency-rate` for `--idle-latency-duration` s, raise to receive
time kept for each datagram. Before each raise the bench reads the workers'
sleep counts: an event raised after a worker went to sleep (since the previous
raise) is one that had to wake it, and its latencies are also summarised apart.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Final

from engine.bench.amqp import BrokerFeed, amqp_round
from engine.bench.baseline import IngestSpec, RunSpec, SenderProcess
from engine.bench.common import (
    EVENT,
    IP,
    MAX_EVENTS_PER_ROUND,
    PACE_TICK_S,
    SEQ_BASE,
    available_cpus,
    make_tag,
    peak_rss,
    process_cpu_ns,
)
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
    wait_idle,
)
from engine.bench.receivers import ReceiverPool, RoundSpec
from engine.bench.stream import engines_scaling, stream_round
from engine.bench.summary import latency_summary, median
from engine.options import EngineOptions
from engine.producer import Engine
from engine.shm.counters import LATENCY_BUCKETS_S
from engine.shm.segment import list_segments, unlink_name
from engine.sources.ingest import Ingest
from engine.statistics import SourceStatistics
from engine.wire import PayloadTooLarge

LATENCY_RATE_CAP: Final = 50_000.0  # events/s
LATENCY_FLOOR_DG_PER_S: Final = 400.0  # the default latency rate's floor, in datagrams/s
CHUNK: Final = 64  # raises between two looks at the clock
IDLE_SUBSCRIBERS: Final = 4  # the idle phase's subscribers: the default bench's
IDLE_SETTLE_S: Final = 1.0  # quiet before the idle CPU window (workers sleep after 100 ms)
RCVBUF_BUDGET: Final = 1 << 30  # bytes of receive buffer asked for, all sockets together
RCVBUF_FLOOR: Final = 256 << 10  # ... but at least this per socket (or --rcvbuf-bytes)
DRAIN_FLOOR_DG_PER_S: Final = 20_000.0  # the slowest drain the time cap allows for
INGEST_LISTEN: Final = "udp:127.0.0.1:0"
INGEST_PROBE_EVENT: Final = "E_BENCH_PROBE"  # not registered: rejected unknown_event
INGEST_QUIET_S: Final = 0.3  # the ingest socket is read out when its count stays put this long
INGEST_SETTLE_CAP_S: Final = 30.0


UNKNOWN: Final = "unknown_event"


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop measuring, clean up, report what was measured."""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kinds = self._kinds(args.transport, args.subscribers)
        self.rounds: list[dict[str, Any]] = []
        self.latency: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self.instances: list[str] = []
        self.engine: Engine | None = None
        self.pool: ReceiverPool | None = None
        self.sender: SenderProcess | None = None
        self.broker: BrokerFeed | None = None  # --source amqp: started by execute()
        self.stream_scaling: dict[str, Any] = {}  # --source stream: engines_scaling()
        self.scraper = Scraper()
        self.progress = Progress(False, lambda: 0)
        self.socket_dir = ""
        self.worker_rss: dict[int, int] = {}
        self.producer_rss = 0
        self.worker_cpus: list[Any] = []
        cpus = available_cpus()
        self.cpus = cpus
        workers = args.workers or max(1, len(cpus) - 1)
        if len(cpus) > workers:
            spare = [cpus[0], *cpus[workers + 1 :]]
            self.receiver_cpus = spare if args.receiver_cpus == "auto" else None
            self.sender_cpus: list[int] | None = [cpus[1]]
        else:
            self.receiver_cpus = self.sender_cpus = None
        # Receive buffers: --rcvbuf-bytes per socket, within RCVBUF_BUDGET for all of
        # them (1,000 sockets of 64 MiB could pin gigabytes of kernel memory).
        per_socket = max(RCVBUF_FLOOR, RCVBUF_BUDGET // max(1, args.subscribers))
        self.rcvbuf = min(args.rcvbuf_bytes, per_socket)
        self.idle: dict[str, Any] | None = None
        per_round = len(self.contenders()) * (args.duration + 14) + args.subscribers / 10
        idle_s = args.idle_latency_duration + args.idle_cpu_duration + IDLE_SETTLE_S + 40
        self.lifetime_s = args.rounds * per_round + args.latency_duration + idle_s + 180

    @staticmethod
    def _kinds(transport: str, n: int) -> list[str]:
        if transport == "mixed":
            return [("udp", "udp6", "unix")[i % 3] for i in range(n)]
        return [transport] * n

    # -- the run ----------------------------------------------------------------------------------
    def execute(self) -> str | None:
        """Measure everything; return None, or the signal that interrupted it."""
        args = self.args
        self.socket_dir = tempfile.mkdtemp(prefix="edg-bench-", dir="/tmp")
        slot = max(2048, (args.payload_bytes + 64 + 4095) // 4096 * 4096)
        try:
            self.pool = ReceiverPool(
                self.kinds,
                args.receivers,
                self.socket_dir,
                self.rcvbuf,
                slot,
                self.receiver_cpus,
                self.lifetime_s,
            )
            self.sender = SenderProcess(self.sender_cpus, self.lifetime_s)
            self.progress = Progress(not args.quiet, self.pool.received_total)
            if {"amqp", "stream"} & set(self.contenders()):
                self.progress.phase = "starting the broker"
                self.broker = BrokerFeed(getattr(args, "amqp_url", None))
            contenders = self.contenders()
            self.progress.total = (
                args.rounds * len(contenders)
                + (1 if args.latency_duration else 0)
                + (1 if self._idle_wanted() else 0)
            )
            for r in range(1, args.rounds + 1):
                for contender in contenders:
                    idle = self._wait_idle()
                    if contender == "engine":
                        result = self._engine_round(r, args.rate, args.duration, "seq")
                    elif contender == "ingest":
                        result = self._ingest_round(r)
                    elif contender == "amqp":
                        assert self.broker is not None
                        result = amqp_round(self, self.broker, r)
                    elif contender == "stream":
                        assert self.broker is not None
                        result = stream_round(self, self.broker, r)
                    else:
                        result = self._sender_round(r, contender)
                    result["idle_wait"] = idle
                    self._record(result)
            if self.broker is not None and "stream" in contenders:
                self.stream_scaling = engines_scaling(
                    self.broker, args.amqp_messages, self.progress
                )
            if args.latency_duration:
                self._latency_phase()
            if self._idle_wanted():
                self._idle_phase()
        except Interrupted as exc:
            return str(exc) or "SIGTERM"
        except KeyboardInterrupt:
            return "SIGINT"
        return None

    def contenders(self) -> list[str]:
        """Each round's contenders, in order: --source api (engine), ingest, both, or
        amqp (an API round and a broker round)."""
        source = getattr(self.args, "source", "api")
        sides = {
            "api": ["engine"],
            "ingest": ["ingest"],
            "both": ["engine", "ingest"],
            "amqp": ["engine", "amqp"],
            "stream": ["engine", "stream"],
        }[source]
        return [*sides, "baseline"] + ([] if self.args.no_ceiling else ["ceiling"])

    def _idle_wanted(self) -> bool:
        return bool(self.args.idle_latency_duration or self.args.idle_cpu_duration)

    def _wait_idle(self) -> dict[str, Any] | None:
        """With --wait-idle: before a round, wait (bounded) for the machine to go quiet."""
        if not self.args.wait_idle:
            return None
        self.progress.phase = "waiting for the machine to go idle"
        return wait_idle(self.args.wait_idle)

    def _record(self, result: dict[str, Any]) -> None:
        self.rounds.append(result)
        self.progress.done += 1
        self.progress.note(
            f"round {result['round']} {result['contender']:<8} "
            f"{result['datagrams_received_per_s']:>11,.0f} dg/s received, "
            f"{result['datagrams_sent_per_s']:>11,.0f} sent, loss {result['loss']:,} "
            f"(engine {result.get('engine_loss', 0):,}, receivers' overflow "
            f"{result.get('receiver_overflow', 0):,})"
        )

    def _latency_phase(self) -> None:
        args = self.args
        engine_rounds = [r for r in self.rounds if r["contender"] == "engine"]
        rate = args.latency_rate
        if not rate:
            best = median(
                [
                    min(r["events_accepted_per_s"], r["datagrams_received_per_s"] / len(self.kinds))
                    for r in engine_rounds
                ]
            )
            # The floor is in datagrams: 100 events/s to 4 subscribers, 0.4 to 1,000
            # (100 events/s to 1,000 subscribers would be more than the workers send).
            floor = LATENCY_FLOOR_DG_PER_S / len(self.kinds)
            rate = min(LATENCY_RATE_CAP, max(floor, 0.5 * (best or 0.0)))
        idle = self._wait_idle()
        result = self._engine_round(0, rate, args.latency_duration, "latency")
        result["idle_wait"] = idle
        samples = result.pop("_latencies")
        result["contender"] = "latency"
        self.progress.done += 1
        self.latency = {
            "round": result,
            "latency_s": latency_summary(samples, rate, args.latency_duration),
        }
        lat = self.latency["latency_s"]
        if lat["p99"] is not None:
            self.progress.note(
                f"latency at {rate:,.0f} events/s: p50 {lat['p50'] * 1e6:,.0f} us, "
                f"p99 {lat['p99'] * 1e6:,.0f} us, loss {result['loss']:,}"
            )

    def _idle_phase(self) -> None:
        args = self.args
        idle = self._wait_idle()
        rate = args.idle_latency_rate
        result = self._engine_round(0, rate, args.idle_latency_duration, "idle")
        result["idle_wait"] = idle
        samples = result.pop("_latencies")
        seqs = result.pop("_latency_seqs")
        woke = result.pop("_woke")
        result["contender"] = "idle"
        self.progress.done += 1
        after_sleep: array.array[int] = array.array("q")
        polling: array.array[int] = array.array("q")
        for latency, seq in zip(samples, seqs, strict=True):
            (after_sleep if 0 <= seq < len(woke) and woke[seq] else polling).append(latency)
        duration = args.idle_latency_duration
        result["events_after_sleep"] = sum(woke)
        result["workers_cpu_percent_while_raising"] = (
            100 * per(result["cpu_s"]["workers"], result["window_s"]) if duration else None
        )
        result["latency_after_sleep_s"] = latency_summary(after_sleep, rate, duration)
        result["latency_while_polling_s"] = latency_summary(polling, rate, duration)
        self.idle = {
            "round": result,
            "latency_s": latency_summary(samples, rate, duration) if duration else {},
        }
        cpu = ", ".join(f"worker {k} {v:.3f}%" for k, v in result["idle_cpu"]["percent"].items())
        lat = self.idle["latency_s"]
        if lat and lat["p99"] is not None:
            cpu += (
                f"; latency at {rate:,.0f} events/s: p50 {lat['p50'] * 1e6:,.0f} us, "
                f"p99 {lat['p99'] * 1e6:,.0f} us, {result['events_after_sleep']} of "
                f"{result['events']} events woke a sleeping worker"
            )
        self.progress.note(f"idle: CPU {cpu}")

    def _quiet(self, engine: Engine, worker_pids: list[int]) -> dict[str, Any]:
        """The idle phase's quiet period: nothing raised for IDLE_SETTLE_S, then for
        --idle-cpu-duration s over which each worker's CPU time is measured."""
        window = self.args.idle_cpu_duration
        self.progress.phase = "idle phase: quiet"
        rings = engine.supervisor.rings
        sleeps_at_start = sum(r.sleeps for r in rings)
        time.sleep(IDLE_SETTLE_S)
        sleeps0 = [r.sleeps for r in rings]
        cpu0 = [process_cpu_ns(pid) for pid in worker_pids]
        t0 = time.monotonic_ns()
        if window:
            self.progress.phase = f"idle phase: measuring idle CPU for {window:g} s"
            time.sleep(window)
        t1 = time.monotonic_ns()
        cpu1 = [process_cpu_ns(pid) for pid in worker_pids]
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

    # -- one engine round ------------------------------------------------------------------------
    def _engine_round(self, number: int, rate: float, duration: float, mode: str) -> dict[str, Any]:
        args = self.args
        pool = self.pool
        assert pool is not None
        instance = f"bench{os.getpid()}" + ("i" if mode == "idle" else f"r{number}")
        self.instances.append(instance)
        options = EngineOptions(
            instance=instance,
            workers=args.workers,
            full_ring_policy=args.full_ring_policy,
            ring_bytes=args.ring_bytes,
        )
        engine = Engine(options, events=[EVENT])
        self.engine = engine
        phase = {"latency": "latency phase", "idle": "idle phase"}.get(
            mode, f"engine round {number}"
        )
        sockets = pool.sockets[:IDLE_SUBSCRIBERS] if mode == "idle" else pool.sockets
        self.progress.phase = f"{phase}: starting the engine"
        quiet: dict[str, Any] | None = None
        woke = bytearray()
        try:
            engine.start()
            for text in sockets:
                engine.subscribe(EVENT, text)
            workers = engine.statistics().workers
            worker_pids = [w.pid or 0 for w in workers]
            self.worker_cpus = [affinity(pid) for pid in worker_pids]
            tag = make_tag(args.payload_bytes, time.monotonic_ns())
            pids = {"producer": [os.getpid()], "workers": worker_pids, "receivers": pool.pids}
            start_ns = time.monotonic_ns()
            pool.begin(RoundSpec(mode, start_ns, tag, EVENT, SEQ_BASE))
            if mode == "idle":
                quiet = self._quiet(engine, worker_pids)
            others = [p for p in (self.sender.pid if self.sender else 0,) if p]
            before = snapshot(pids, others)
            self.progress.phase = phase + (f" at {rate:,.0f} events/s" if rate else "")
            self.scraper.start(engine)
            if mode == "idle":
                raised, oversize, t0, t_raised, woke = self._raise_idle(
                    engine, tag, rate, duration, quiet.pop("_sleeps_at_start") if quiet else 0
                )
            else:
                raised, oversize, t0, t_raised = self._raise(engine, tag, rate, duration)
            pending = sum(w.pairs_in_ring for w in engine.statistics().workers)
            self.progress.phase = f"{phase}: draining {pending:,} datagrams"
            cap = max(60.0, 4 * duration + pending / DRAIN_FLOOR_DG_PER_S)
            t_drained = wait_drained(engine, cap)
            self.scraper.stop()
            stats = engine.statistics()
            # The producer's peak so far: before the latency samples arrive (the bench's
            # own analysis is not the producer's memory).
            self.producer_rss = max(self.producer_rss, peak_rss(os.getpid()) or 0)
            self.progress.phase = f"{phase}: collecting"
            pool.settle(stats.pairs_sent)
            report = pool.report()
            after = snapshot(pids, others)
            for k, pid in enumerate(worker_pids):
                self.worker_rss[k] = max(self.worker_rss.get(k, 0), peak_rss(pid) or 0)
        finally:
            self.scraper.stop()
            self.engine = None
            stop_engine(engine, instance)
        failures = send_failures(stats)
        sent = stats.pairs_sent
        result = round_record(
            number,
            "engine",
            report,
            before,
            after,
            t0,
            t_raised,
            t_drained,
            stats.events_queued,
            sent,
            failures,
        )
        add_engine_loss(result, stats, len(sockets))
        cpu = result["cpu_s"]
        result["datagrams_per_sending_cpu_s"] = per(sent, cpu["producer"] + cpu["workers"])
        drain_s = (t_drained - t_raised) / 1e9
        result.update(
            events=raised,
            events_raised=stats.raised,
            events_queued=stats.events_queued,
            drops=dict(stats.drops),
            oversize=stats.oversize + oversize,
            identity_errors=stats.identity_errors(),
            pairs_queued=sum(w.pairs_queued for w in stats.workers),
            pairs_stale=stats.pairs_stale,
            subscribed=len(sockets),
            rate_target=rate or None,
            worker_pids=worker_pids,
            drain_s=drain_s,
            backlog={
                "max_pending_datagrams": options.max_pending_datagrams,
                "pending_at_end_of_raising": pending,
                "peak_pending_sampled": max(pending, self.scraper.round_peak_pending),
                "drain_s": drain_s,
                "drain_datagrams_per_s": per(pending, drain_s) if pending else None,
                "ring_full": stats.drops.get("ring_full", 0),
                "pairs_stale": stats.pairs_stale,
            },
            metrics_scrapes=self.scraper.round_summary(),
        )
        if mode in ("latency", "idle"):
            counts, total_ns = stats.latency_buckets()
            result["engine_raise_to_send"] = {
                "le_s": [*LATENCY_BUCKETS_S, "+Inf"],
                "counts": counts,
                "sum_s": total_ns / 1e9,
            }
            result["_latencies"] = report.latencies_ns
        if mode == "idle":
            assert quiet is not None
            result["idle_cpu"] = quiet
            result["worker_sleeps"] = [w.sleeps for w in stats.workers]
            result["_latency_seqs"] = report.latency_seqs
            result["_woke"] = woke
        return result

    def _raise(
        self, engine: Engine, tag: str, rate: float, duration: float
    ) -> tuple[int, int, int, int]:
        """Raise events for `duration` s, as fast as accepted or paced at `rate`.
        Returns (events raised, oversize, t0, t_end) (monotonic ns)."""
        raise_event = engine.raise_event
        clock = time.monotonic_ns
        seq = SEQ_BASE
        n = oversize = 0
        t0 = clock()
        end = t0 + int(duration * 1e9)
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
        return n, oversize, t0, clock()

    def _raise_idle(
        self, engine: Engine, tag: str, rate: float, duration: float, sleeps_at_quiet: int
    ) -> tuple[int, int, int, int, bytearray]:
        """The idle phase's raises: paced at `rate` (sleeping between events, never
        spinning). Before each raise, the workers' sleep counts say whether one of them
        went to sleep since the previous raise (for the first: since the quiet period
        began), i.e. whether this event had to wake it. Returns (events raised,
        oversize, t0, t_end, woke) with woke[i] = 1 for such an event."""
        rings = engine.supervisor.rings
        clock = time.monotonic_ns
        woke = bytearray()
        n = oversize = 0
        t0 = clock()
        end = t0 + int(duration * 1e9)
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
            try:
                engine.raise_event(EVENT, {"tag": tag, "seq": SEQ_BASE + n, "ip": IP, "t": clock()})
            except PayloadTooLarge:
                oversize += 1
            n += 1
        return n, oversize, t0, clock(), woke

    # -- one ingest round -----------------------------------------------------------------------
    def _ingest_round(self, number: int) -> dict[str, Any]:
        """An engine round fed through an ingest socket by the sender process."""
        args = self.args
        pool, sender = self.pool, self.sender
        assert pool is not None and sender is not None
        instance = f"bench{os.getpid()}g{number}"
        self.instances.append(instance)
        options = EngineOptions(
            instance=instance,
            workers=args.workers,
            full_ring_policy=args.full_ring_policy,
            ring_bytes=args.ring_bytes,
        )
        engine = Engine(options, events=[EVENT])
        self.engine = engine
        phase = f"ingest round {number}"
        self.progress.phase = f"{phase}: starting the engine"
        ingest: Ingest | None = None
        try:
            engine.start()
            for text in pool.sockets:
                engine.subscribe(EVENT, text)
            ingest = Ingest(engine, [INGEST_LISTEN])
            engine.add_source(ingest)
            ingest.start()
            address = ingest.sockets[0].sock.getsockname()
            workers = engine.statistics().workers
            worker_pids = [w.pid or 0 for w in workers]
            self.worker_cpus = [affinity(pid) for pid in worker_pids]
            tag = make_tag(args.payload_bytes, time.monotonic_ns())
            pids = {
                "producer": [os.getpid()],
                "workers": worker_pids,
                "emitter": [sender.pid],
                "receivers": pool.pids,
            }
            pool.begin(RoundSpec("seq", time.monotonic_ns(), tag, EVENT, SEQ_BASE))
            before = snapshot(pids, [])
            rate = ingest_rate(args)
            self.progress.phase = phase + (f" at {rate:,.0f} events/s" if rate else "")
            # No metrics scraper here, and no statistics() until the socket is quiet:
            # Engine.statistics() takes the ingest socket's lock under the engine's
            # `_hot` lock while the ingest thread raises (takes `_hot`) under the
            # socket's lock, a lock-order inversion that deadlocks under load.
            out = sender.run(
                "ingest",
                IngestSpec(
                    (address[0], address[1]),
                    args.duration,
                    rate,
                    tag,
                    getattr(args, "emitter_sched", "normal") == "idle",
                ),
            )
            t0, t_raised = out["t0_ns"], out["t_end_ns"]
            self.progress.phase = f"{phase}: reading out the ingest socket"
            self._settle_ingest(ingest, address)
            pending = sum(w.pairs_in_ring for w in engine.statistics().workers)
            self.progress.phase = f"{phase}: draining {pending:,} datagrams"
            cap = max(60.0, 4 * args.duration + pending / DRAIN_FLOOR_DG_PER_S)
            t_drained = wait_drained(engine, cap)
            stats = engine.statistics()  # the ingest socket's counters included
            source = next(s for s in stats.sources if s.kind == "ingest")
            self.producer_rss = max(self.producer_rss, peak_rss(os.getpid()) or 0)
            self.progress.phase = f"{phase}: collecting"
            pool.settle(stats.pairs_sent)
            report = pool.report()
            after = snapshot(pids, [])
            for k, pid in enumerate(worker_pids):
                self.worker_rss[k] = max(self.worker_rss.get(k, 0), peak_rss(pid) or 0)
        finally:
            self.scraper.stop()
            self.engine = None
            if ingest is not None:
                ingest.stop()
            stop_engine(engine, instance)
        failures = send_failures(stats)
        sent = stats.pairs_sent
        ingested = source.received - 1  # the probe is not one of the events
        result = round_record(
            number,
            "ingest",
            report,
            before,
            after,
            t0,
            t_raised,
            t_drained,
            source.raised,
            sent,
            failures,
        )
        add_engine_loss(result, stats, len(pool.sockets))
        cpu = result["cpu_s"]
        result["datagrams_per_sending_cpu_s"] = per(sent, cpu["producer"] + cpu["workers"])
        sending_s = (t_raised - t0) / 1e9
        rejected = dict(source.rejected)
        rejected[UNKNOWN] = rejected.get(UNKNOWN, 0) - 1  # the probe
        drain_s = (t_drained - t_raised) / 1e9
        result.update(
            events=source.raised,
            events_raised=stats.raised,
            events_queued=stats.events_queued,
            drops=dict(stats.drops),
            oversize=stats.oversize,
            identity_errors=stats.identity_errors(),
            pairs_queued=sum(w.pairs_queued for w in stats.workers),
            pairs_stale=stats.pairs_stale,
            subscribed=len(pool.sockets),
            rate_target=rate or None,
            worker_pids=worker_pids,
            drain_s=drain_s,
            ingest={
                "socket": source.name,
                "datagrams_emitted": out["sent"],
                "emit_failures": out["failures"],
                "datagrams_emitted_per_s": per(out["sent"], sending_s),
                "events_ingested": ingested,
                "events_ingested_per_s": per(ingested, sending_s),
                "events_raised": source.raised,
                "rejected": {k: v for k, v in rejected.items() if v},
                "kernel_drops": source.kernel_drops,
                "cpu_us_per_event": {role: per(1e6 * v, ingested) for role, v in cpu.items()},
            },
            backlog={
                "max_pending_datagrams": options.max_pending_datagrams,
                "pending_at_end_of_raising": pending,
                "peak_pending_sampled": max(pending, self.scraper.round_peak_pending),
                "drain_s": drain_s,
                "drain_datagrams_per_s": per(pending, drain_s) if pending else None,
                "ring_full": stats.drops.get("ring_full", 0),
                "pairs_stale": stats.pairs_stale,
            },
        )
        return result

    @staticmethod
    def _settle_ingest(ingest: Ingest, address: tuple[str, int]) -> None:
        """Wait (bounded) until the ingest thread has read what the kernel holds, then
        send the probe and wait for it: its SO_RXQ_OVFL brings the last kernel drops."""

        def count() -> SourceStatistics:
            return ingest.statistics()[0]

        deadline = time.monotonic() + INGEST_SETTLE_CAP_S
        last, since = count().received, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < INGEST_QUIET_S:
            time.sleep(0.05)
            now = count().received
            if now != last:
                last, since = now, time.monotonic()
        probe = json.dumps({"jsonrpc": "2.0", "method": INGEST_PROBE_EVENT}).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(probe, address)
        while time.monotonic() < deadline and count().rejected.get(UNKNOWN, 0) < 1:
            time.sleep(0.01)

    # -- one baseline or ceiling round ------------------------------------------------------------
    def _sender_round(self, number: int, contender: str) -> dict[str, Any]:
        args = self.args
        pool, sender = self.pool, self.sender
        assert pool is not None and sender is not None
        self.progress.phase = f"{contender} round {number}"
        tag = make_tag(args.payload_bytes, time.monotonic_ns())
        pids = {"sender": [sender.pid], "receivers": pool.pids}
        pool.begin(
            RoundSpec(
                "seq" if contender == "baseline" else "count",
                time.monotonic_ns(),
                tag,
                EVENT,
                SEQ_BASE,
            )
        )
        before = snapshot(pids, [os.getpid()])
        spec = RunSpec(
            pool.sockets,
            args.duration,
            args.rate if contender == "baseline" else 0.0,
            tag,
            args.baseline_encode_once,
        )
        out = sender.run("naive" if contender == "baseline" else "ceiling", spec)
        pool.settle(out["sent"])
        report = pool.report()
        after = snapshot(pids, [os.getpid()])
        result = round_record(
            number,
            contender,
            report,
            before,
            after,
            out["t0_ns"],
            out["t_end_ns"],
            out["t_end_ns"],
            out["events"],
            out["sent"],
            out["failures"],
        )
        result["datagrams_per_sending_cpu_s"] = per(out["sent"], result["cpu_s"]["sender"])
        result.update(events=out["events"], drops={}, oversize=0, identity_errors=[])
        return result

    # -- the end ---------------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Stop and remove everything this run started or created; return what was
        left over and had to be removed by force (normally nothing)."""
        leftovers: list[str] = []
        self.scraper.stop()
        if self.engine is not None:
            stop_engine(self.engine, self.instances[-1])
            self.engine = None
        for instance in self.instances:
            for name in list_segments(instance):
                unlink_name(name)
                leftovers.append(f"/dev/shm/{name}")
        for closer in (self.pool, self.sender, self.broker):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.progress.stop()
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        return leftovers

    def rss(self) -> dict[str, Any]:
        return {
            "producer": self.producer_rss or None,
            "workers": [self.worker_rss[k] for k in sorted(self.worker_rss)],
            "receivers": [peak_rss(pid) for pid in self.pool.pids] if self.pool else [],
            "sender": peak_rss(self.sender.pid) if self.sender else None,
        }

    def settings(self) -> dict[str, Any]:
        a = self.args
        settings: dict[str, Any] = {
            k: v for k, v in vars(a).items() if isinstance(v, int | float | str | None)
        }
        settings.update(
            duration_s=a.duration,
            workers_effective=len(self.worker_rss) or a.workers or max(1, len(self.cpus) - 1),
            receiver_vlen=self.pool.vlen if self.pool else None,
            rcvbuf_bytes_per_socket=self.rcvbuf,
            engine_options={
                k: getattr(EngineOptions(), k)
                for k in ("max_pending_datagrams", "max_delay_ms", "idle_poll_ms", "batch_max")
            },
            idle_subscribers=min(IDLE_SUBSCRIBERS, len(self.kinds)),
            idle_settle_s=IDLE_SETTLE_S,
            sockets=self.pool.sockets if self.pool else [],
            instances=self.instances,
            processes={
                "bench": os.getpid(),
                "receivers": self.pool.pids if self.pool else [],
                "sender": self.sender.pid if self.sender else None,
            },
            socket_dir=self.socket_dir,
            cpu_plan={
                "engine": "producer on the first CPU, one worker per other CPU (engine default)",
                "workers": self.worker_cpus,
                "receivers": self.receiver_cpus,
                "baseline_and_ceiling_sender": self.sender_cpus,
            },
            baseline="one process: json.dumps + non-blocking sendto per subscriber per event"
            + (" (encoded once per event)" if a.baseline_encode_once else ""),
            ingest=None
            if "ingest" not in self.contenders()
            else f"an engine with an ingest socket ({INGEST_LISTEN}), fed by the sender process:"
            " one encoded E_BENCH notification, seq and t rewritten per datagram, sendmmsg "
            "256 per call on a connected socket"
            + (", under SCHED_IDLE" if getattr(a, "emitter_sched", "normal") == "idle" else ""),
            ceiling=None
            if a.no_ceiling
            else "one process: pre-encoded payloads, sendmmsg 256 per call per connected socket",
            latency_rate=self.latency["latency_s"]["rate_events_per_s"] if self.latency else None,
            payload=(
                '{"jsonrpc":"2.0","method":"E_BENCH","params":{"tag":<padding>,'
                '"seq":<n>,"ip":"192.168.2.11","t":<monotonic ns>}}'
            ),
        )
        return settings


# -- helpers ---------------------------------------------------------------------------------------


def ingest_rate(args: argparse.Namespace) -> float:
    """The ingest emitter's events/s: --ingest-rate, else --rate (0 = full speed)."""
    rate = getattr(args, "ingest_rate", None)
    return float(args.rate if rate is None else rate)
