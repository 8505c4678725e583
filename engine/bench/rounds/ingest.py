"""The ingest contender (`--source ingest|both`): an engine round fed through a
datagram ingest socket (`udp:127.0.0.1:0`, `sources.ingest.Ingest`, read by its
thread in this process) instead of `Engine.raise_event`: the sender process emits
the E_BENCH notifications to it with sendmmsg (`baseline.run_ingest`) for
`--duration` s, as fast as it can or at `--ingest-rate` (default `--rate`); the
round then waits until the ingest socket is read out and sends it one probe (a
notification of an unknown event, rejected `unknown_event`: the kernel reports its
drops at the socket with the next datagram read, so the probe makes the last of
them known). The probe is not counted among the events ingested."""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import Any, Final

from engine.bench.baseline import IngestSpec
from engine.bench.live import per
from engine.bench.receivers import RoundReport
from engine.bench.rounds.skeleton import BenchHost, EngineRound, Window
from engine.sources.ingest import Ingest
from engine.statistics import SourceStatistics

INGEST_LISTEN: Final = "udp:127.0.0.1:0"
INGEST_PROBE_EVENT: Final = "E_BENCH_PROBE"  # not registered: rejected unknown_event
INGEST_QUIET_S: Final = 0.3  # the ingest socket is read out when its count stays put this long
INGEST_SETTLE_CAP_S: Final = 30.0
UNKNOWN: Final = "unknown_event"


def ingest_rate(args: argparse.Namespace) -> float:
    """The ingest emitter's events/s: --ingest-rate, else --rate (0: as fast as it can)."""
    rate = getattr(args, "ingest_rate", None)
    return float(args.rate if rate is None else rate)


class IngestRound(EngineRound):
    contender = "ingest"
    letter = "g"

    def __init__(self, bench: BenchHost, number: int) -> None:
        super().__init__(bench, number)
        assert bench.sender is not None
        self.sender = bench.sender
        self.ingest: Ingest | None = None
        self.address: tuple[str, int] = ("", 0)
        self.rate = ingest_rate(self.args)
        self.out: dict[str, Any] = {}

    def set_up(self) -> None:
        super().set_up()
        self.ingest = Ingest(self.engine, [INGEST_LISTEN])
        self.engine.add_source(self.ingest)
        self.ingest.start()
        self.address = self.ingest.sockets[0].sock.getsockname()
        self.pids["emitter"] = [self.sender.pid]
        self.pids = {k: self.pids[k] for k in ("producer", "workers", "emitter", "receivers")}

    def stop_source(self) -> None:
        if self.ingest is not None:
            self.ingest.stop()

    def feed(self) -> tuple[int, int, int]:
        args, rate = self.args, self.rate
        self.bench.progress.phase = self.phase + (f" at {rate:,.0f} events/s" if rate else "")
        # No metrics scraper here, and no statistics() until the socket is quiet:
        # Engine.statistics() takes the ingest socket's lock under the engine's
        # `_hot` lock while the ingest thread raises (takes `_hot`) under the
        # socket's lock, a lock-order inversion that deadlocks under load.
        idle = getattr(args, "emitter_sched", "normal") == "idle"
        spec = IngestSpec(self.address, args.duration, rate, self.tag, idle)
        self.out = out = self.sender.run("ingest", spec)
        self.bench.progress.phase = f"{self.phase}: reading out the ingest socket"
        assert self.ingest is not None
        self._settle(self.ingest)
        raised = self.ingest.statistics()[0].raised
        return raised, out["t0_ns"], out["t_end_ns"]

    def _settle(self, ingest: Ingest) -> None:
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
            s.sendto(probe, self.address)
        while time.monotonic() < deadline and count().rejected.get(UNKNOWN, 0) < 1:
            time.sleep(0.01)

    def finish(self, result: dict[str, Any], window: Window, report: RoundReport) -> None:
        stats = self.stats
        assert stats is not None
        source = next(s for s in stats.sources if s.kind == "ingest")
        window.events = source.raised  # the probe was read after feed() counted
        super().finish(result, window, report)
        out = self.out
        cpu = result["cpu_s"]
        ingested = source.received - 1  # the probe is not one of the events
        sending_s = (window.t_raised - window.t0) / 1e9
        rejected = dict(source.rejected)
        rejected[UNKNOWN] = rejected.get(UNKNOWN, 0) - 1  # the probe
        backlog = self.backlog(window)
        result.update(
            oversize=stats.oversize,
            pairs_queued=sum(w.pairs_queued for w in stats.workers),
            pairs_stale=stats.pairs_stale,
            rate_target=self.rate or None,
            drain_s=backlog["drain_s"],
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
            backlog=backlog,
        )
