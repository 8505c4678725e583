"""The bench run: receivers and the reference sender started once, then the
interleaved rounds (engine, ingest, amqp, stream, baseline, ceiling, as --source
asks), the latency phase and the idle phase, each round one `rounds/` contender
run through the one skeleton (rounds/skeleton.py). This module orchestrates: it
orders the rounds, derives the latency phase's rate, splits the idle phase's
latencies into the events that woke a sleeping worker and the others, and cleans
up whatever a round left behind (shared memory, sockets, processes).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
import shutil
import tempfile
from typing import Any, Final

from engine.bench.amqp import BrokerFeed
from engine.bench.baseline import SenderProcess
from engine.bench.common import available_cpus, peak_rss
from engine.bench.live import Progress, Scraper, per, stop_engine, wait_idle
from engine.bench.probes import c_wake
from engine.bench.receivers import ReceiverPool
from engine.bench.rounds.api import IDLE_SETTLE_S, IDLE_SUBSCRIBERS, ApiRound
from engine.bench.rounds.broker import AmqpRound, StreamRound
from engine.bench.rounds.ingest import INGEST_LISTEN, IngestRound
from engine.bench.rounds.sender import SenderRound
from engine.bench.rounds.skeleton import Round
from engine.bench.stream import engines_scaling
from engine.bench.summary import latency_summary, median
from engine.options import EngineOptions
from engine.producer import Engine
from engine.shm.segment import list_segments, unlink_name

LATENCY_RATE_CAP: Final = 50_000.0  # events/s
LATENCY_FLOOR_DG_PER_S: Final = 400.0  # the default latency rate's floor, in datagrams/s
C_WAKE_EVENTS: Final = 60  # the C chain in the idle phase: 60 events 50 ms apart, 3 s
C_WAKE_GAP_MS: Final = 50
RCVBUF_BUDGET: Final = 1 << 30  # bytes of receive buffer asked for, all sockets together
RCVBUF_FLOOR: Final = 256 << 10  # ... but at least this per socket (or --rcvbuf-bytes)


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
        # the C chain and the Python one: their events, gcc and start-up
        c_chain_s = 2 * C_WAKE_EVENTS * C_WAKE_GAP_MS / 1000 + 20
        idle_s = args.idle_latency_duration + args.idle_cpu_duration + IDLE_SETTLE_S + 40
        idle_s += c_chain_s
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
                    result = self._round(contender, r).run()
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

    def _round(self, contender: str, number: int) -> Round:
        args = self.args
        if contender == "engine":
            return ApiRound(self, number, args.rate, args.duration, "seq")
        if contender == "ingest":
            return IngestRound(self, number)
        if contender in ("amqp", "stream"):
            assert self.broker is not None
            kind = AmqpRound if contender == "amqp" else StreamRound
            return kind(self, number, self.broker)
        return SenderRound(self, number, contender)

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
        result = ApiRound(self, 0, rate, args.latency_duration, "latency").run()
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
        result = ApiRound(self, 0, rate, args.idle_latency_duration, "idle").run()
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
        # Each event's first datagram: the C chain's shape (one wake, one send, one
        # receive); the later ones add the fan-out to the other subscribers.
        first: dict[int, int] = {}
        for latency, seq in zip(samples, seqs, strict=True):
            first[seq] = min(latency, first.get(seq, latency))
        firsts = array.array("q", first.values())
        result["latency_first_datagram_s"] = latency_summary(firsts, rate, duration)
        result["latency_while_polling_s"] = latency_summary(polling, rate, duration)
        self.idle = {
            "round": result,
            "latency_s": latency_summary(samples, rate, duration) if duration else {},
            # the kernel's own wake -> send -> recv chain, run now so both share the machine
            "c_wake": c_wake.run(C_WAKE_EVENTS, C_WAKE_GAP_MS) if duration else {},
            # the same chain in Python: what CPython itself costs it
            "py_wake": c_wake.run_python(C_WAKE_EVENTS, C_WAKE_GAP_MS) if duration else {},
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
