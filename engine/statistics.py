"""Frozen snapshots of the engine's counters: one source of truth for tests,
the bench and the metrics collector."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.shm.counters import LATENCY_BUCKETS_S, TRANSPORTS, CounterLayout
from engine.shm.ring import RingStatistics


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    index: int
    pid: int | None
    alive: bool
    restarts: int
    ring: RingStatistics
    pairs_queued: int  # (event, subscriber) pairs appended to this worker's ring
    pairs_dropped: int  # pairs lost because the ring was full
    records_dropped: int  # event records lost because the ring was full
    pairs_sent: int
    pairs_failed: int
    pairs_consumed: int  # pairs of the event records the worker has finished
    pairs_stale: int  # pairs not sent: the event was older than engine.max_delay_ms
    redelivered_pairs: int  # pairs possibly sent twice (a worker died mid-batch)
    subscribers: int  # subscriber sockets the worker serves
    shared_subscribers: int  # of those, on a shared unconnected socket (beyond socket_limit)
    failures: dict[tuple[str, str], int]  # (transport, reason) -> failed pairs
    counters: tuple[int, ...]  # the raw counter area (see counters.CounterLayout)

    sleeps: int  # times the worker went to sleep until woken (idle)
    pairs_filtered: int = 0  # pairs not sent: the subscription's filter did not match
    failovers: int = 0  # datagrams a failed group member passed on to another member
    # times the supervisor rang for this worker asleep with records waiting (a lost
    # wake-up: expected 0; shm/doorbell.py)
    lost_wakeups: int = 0

    @property
    def pairs_in_ring(self) -> int:
        """Pairs queued but not yet handled: queued = sent + failed + stale + filtered
        + in ring."""
        return self.pairs_queued - self.pairs_consumed


@dataclass(frozen=True, slots=True)
class GroupStatistics:
    """One ``virtual:`` group of one event (engine.targets)."""

    event: str
    group: str  # as listed: virtual:POLICY m1 m2 ...
    failovers: int  # datagrams a failed member passed on to another member
    members_down: int  # members skipped until failover_timeout_s, as of its last event
    sent_by_member: list[tuple[str, int]]  # (member socket, datagrams sent to it)


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    """One source's counters (an ingest socket, an upstream, a broker queue)."""

    kind: str  # "ingest", "upstream", "amqp", "stream"
    name: str  # its socket, MI target or queue
    received: int = 0  # datagrams or messages read
    raised: int = 0  # events handed to the raise path
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> received, not raised
    kernel_drops: int = 0  # dropped by the kernel before we could read them
    up: int | None = None  # connected / subscribed (1) or not (0); None: not applicable
    events: int = 0  # events it takes (an upstream's subscribed events)
    errors: dict[str, int] = field(default_factory=dict)  # reason -> failures of its own
    reconnects: int = 0  # connections made again after one was lost (a broker source)
    lag: int | None = None  # messages waiting at the broker for it; None: not known
    refused: int = 0  # events asked for that it cannot take (an upstream's: here or there)
    offset: int | None = None  # a stream source's offset stored on the broker; None: none
    missed: int = 0  # a stream's messages gone (retention) before the source read them

    def identity_errors(self) -> list[str]:
        if self.received != self.raised + sum(self.rejected.values()):
            return [
                f"{self.kind} {self.name}: received {self.received} != raised {self.raised} "
                f"+ rejected {self.rejected}"
            ]
        return []


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    events_raised: dict[str, int]
    events_oversize: dict[str, int]
    events_queued: int
    drops: dict[str, int]  # reason -> events
    workers: tuple[WorkerStatistics, ...]
    event_names: dict[int, str]
    max_events: int
    sources: tuple[SourceStatistics, ...] = ()

    @property
    def raised(self) -> int:
        return sum(self.events_raised.values())

    @property
    def oversize(self) -> int:
        return sum(self.events_oversize.values())

    @property
    def pairs_sent(self) -> int:
        return sum(w.pairs_sent for w in self.workers)

    @property
    def pairs_failed(self) -> int:
        return sum(w.pairs_failed for w in self.workers)

    @property
    def pairs_stale(self) -> int:
        return sum(w.pairs_stale for w in self.workers)

    def stale_by_event(self) -> dict[str, int]:
        """Event -> pairs dropped as stale (older than engine.max_delay_ms)."""
        layout = CounterLayout(self.max_events)
        return {
            name: sum(w.counters[layout.stale(eid)] for w in self.workers)
            for eid, name in self.event_names.items()
        }

    def filtered_by_event(self) -> dict[str, int]:
        """Event -> pairs a subscription's filter kept from being sent."""
        layout = CounterLayout(self.max_events)
        return {
            name: sum(w.counters[layout.filtered(eid)] for w in self.workers)
            for eid, name in self.event_names.items()
        }

    @property
    def pairs_filtered(self) -> int:
        return sum(w.pairs_filtered for w in self.workers)

    @property
    def failovers(self) -> int:
        return sum(w.failovers for w in self.workers)

    def sent_by_event(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(event, transport) -> (datagrams, bytes) over all workers."""
        layout = CounterLayout(self.max_events)
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for eid, name in self.event_names.items():
            for t, transport in enumerate(TRANSPORTS):
                n = sum(w.counters[layout.sent(eid, t)] for w in self.workers)
                b = sum(w.counters[layout.sent_bytes(eid, t)] for w in self.workers)
                out[(name, transport)] = (n, b)
        return out

    def latency_buckets(self) -> tuple[list[int], int]:
        """Cumulative-free bucket counts (len(LATENCY_BUCKETS_S)+1) and the sum in ns."""
        layout = CounterLayout(self.max_events)
        n = len(LATENCY_BUCKETS_S) + 1
        counts = [sum(w.counters[layout.latency_base + i] for w in self.workers) for i in range(n)]
        total = sum(w.counters[layout.latency_base + n] for w in self.workers)
        return counts, total

    def identity_errors(self) -> list[str]:
        """Every way the accounting identity (SPEC section 5) fails; empty when it holds."""
        errors = []
        drops = sum(self.drops.values())
        if self.raised != self.oversize + drops + self.events_queued:
            errors.append(
                f"events: raised {self.raised} != oversize {self.oversize} + dropped "
                f"{self.drops} + queued {self.events_queued}"
            )
        for w in self.workers:
            handled = w.pairs_sent + w.pairs_failed + w.pairs_stale + w.pairs_filtered
            if w.pairs_consumed != handled:
                errors.append(
                    f"worker {w.index}: pairs consumed {w.pairs_consumed} != sent "
                    f"{w.pairs_sent} + failed {w.pairs_failed} + stale {w.pairs_stale} "
                    f"+ filtered {w.pairs_filtered}"
                )
            if w.pairs_in_ring < 0 or (w.pairs_in_ring and not w.ring.used_bytes):
                errors.append(
                    f"worker {w.index}: pairs queued {w.pairs_queued} - consumed "
                    f"{w.pairs_consumed} = {w.pairs_in_ring} pairs in ring, but the ring "
                    f"holds {w.ring.used_bytes} bytes"
                )
            if sum(w.failures.values()) != w.pairs_failed:
                errors.append(f"worker {w.index}: failures by reason do not add up")
        for source in self.sources:
            errors.extend(source.identity_errors())
        return errors

    def check_identity(self) -> None:
        errors = self.identity_errors()
        if errors:
            raise AssertionError("; ".join(errors))
