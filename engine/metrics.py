"""Prometheus exposition: one collector in the main process, read at scrape time.

Why this is long: one collector turns every field of the statistics snapshot into its metric family;
the families' names and help texts must agree with the dashboard and the docs,
so they are read in one place.

Workers count in plain integers in the shared counter block (`counters.py`,
whose docstring documents the layout byte by byte); nothing in a worker calls
prometheus-client. At scrape time `EngineCollector` takes one
`Engine.statistics()` snapshot (the same numbers the tests and the bench read),
the subscriber table from the registry, and each worker's CPU and memory from
psutil, and turns them into metric families.

Every known label value (each drop reason, each transport x failure reason,
each registered event) is exposed from the first scrape, at 0, so rates show a
zero line instead of nothing. Labels are bounded: event names (at most
`max_events`), transports, reasons, worker indexes. Subscriber sockets become
labels only with `per_subscriber=True` (config: `[metrics] per_subscriber`).

The accounting identity (SPEC section 5) can be checked from the exposition
alone:

    sum(events_raised_total) = sum(oversize_rejections_total)
                               + sum(drops_total) + events_queued_total
    pairs_queued_total{worker} = pairs_sent_total{worker} + pairs_failed_total{worker}
                                 + pairs_stale_total{worker} + pairs_filtered_total{worker}
                                 + pairs_in_ring{worker}

Both are exact in any one scrape of an idle engine; under load a worker may
commit a batch between the reads of its counters and of its ring, so the right
side can briefly fall short by up to one batch.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psutil
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from engine.producer import DROP_REASONS, Engine
from engine.shm.counters import BATCH_BUCKETS, LATENCY_BUCKETS_S, REASONS, TRANSPORTS, CounterLayout
from engine.statistics import (
    EngineStatistics,
    GroupStatistics,
    SourceStatistics,
    WorkerStatistics,
)
from engine.version import build

_Counts = dict[tuple[str, str], int]  # (listener, reason) -> count


class SecurityCounters(Protocol):
    """What the HTTP listeners refused (engine.mi.http.SecurityCounters): read here
    by shape, so metrics does not import the MI that imports it."""

    listeners: set[str]

    def snapshot(self) -> tuple[_Counts, _Counts, _Counts]: ...


PREFIX: Final = "event_datagram_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
ALIVE_HELP: Final = "Worker processes currently running."


def _bucket_label(bound: float) -> str:
    """Prometheus's own float formatting for `le` (1 -> "1.0", 1e-05 -> "1e-05")."""
    return repr(float(bound))


def cumulative(counts: Iterable[int], bounds: Iterable[float]) -> list[tuple[str, float]]:
    """Non-cumulative bucket counts (one per bound, then +Inf) -> cumulative `le` buckets."""
    labels = [*(_bucket_label(b) for b in bounds), "+Inf"]
    running = list(itertools.accumulate(counts))
    if len(running) != len(labels):
        raise ValueError(f"{len(running)} bucket counts for {len(labels)} buckets")
    return [(le, float(n)) for le, n in zip(labels, running, strict=True)]


@dataclass(slots=True)
class _CpuTrack:
    """Keeps a worker's CPU counter monotonic across restarts (a new pid starts at 0)."""

    pid: int | None = None
    last: float = 0.0  # CPU seconds last seen for `pid`
    base: float = 0.0  # CPU seconds of this worker slot's earlier processes

    def update(self, pid: int | None, seconds: float | None) -> float:
        if pid != self.pid:
            self.base += self.last
            self.pid, self.last = pid, 0.0
        if seconds is not None:
            self.last = max(self.last, seconds)
        return self.base + self.last


class EngineCollector(Collector):
    """Reads one `EngineStatistics` snapshot per scrape and yields the metric families."""

    def __init__(self, engine: Engine, *, per_subscriber: bool = False) -> None:
        self._engine = engine
        self.per_subscriber = per_subscriber
        self._cpu: dict[int, _CpuTrack] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._cpu_lock = threading.Lock()  # two concurrent scrapes share the trackers
        self.http: SecurityCounters | None = None  # what the HTTP listeners refused

    def describe(self) -> Iterable[Metric]:
        return []  # skip the test scrape at registration: the engine may not run yet

    def collect(self) -> Iterator[Metric]:
        if self.http is not None:
            yield from _http_families(self.http)
        engine = self._engine
        supervisor = engine.supervisor
        if not supervisor.running or supervisor.counters is None:
            # Not started, or stopped: the shared memory is gone.
            yield GaugeMetricFamily(PREFIX + "workers_alive", ALIVE_HELP, value=0)
            return
        stats = engine.statistics()
        subscribers = self._subscribers()
        yield from _event_families(stats)
        yield from _worker_families(stats)
        yield from _histograms(stats)
        yield from _source_families(stats)
        yield from _guard_families(engine)
        yield from _subscriber_families(stats, subscribers, self.per_subscriber)
        if self.per_subscriber:
            yield from _subscriber_counters(subscribers, engine.subscriber_counts())
        yield from _group_families(engine.group_statistics())
        alive = sum(w.alive for w in stats.workers)
        yield GaugeMetricFamily(PREFIX + "workers_alive", ALIVE_HELP, value=alive)
        yield from self._process_families(stats)

    def _subscribers(self) -> list[tuple[str, str, str, int | None]]:
        """(event, transport, socket, ttl) of every live subscriber, from the registry."""
        engine = self._engine
        now = time.time()
        out: list[tuple[str, str, str, int | None]] = []
        with engine.lock:
            registry = engine.registry
            for name, _eid in registry.events():
                for sub in registry.subscribers(name):
                    # sub.key: a filtered subscription is told apart by its filter
                    out.append((name, sub.dest.transport, sub.key, sub.ttl(now)))
        return out

    def _process_families(self, stats: EngineStatistics) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            PREFIX + "worker_cpu_seconds_total",
            "CPU time (user + system) of the worker process, summed over its restarts.",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            PREFIX + "worker_resident_memory_bytes",
            "Resident memory of the worker process (absent while it is restarting).",
            labels=["worker"],
        )
        with self._cpu_lock:
            for w in stats.workers:
                seconds: float | None = None
                resident: int | None = None
                if w.pid is not None:
                    with contextlib.suppress(psutil.Error, OSError):
                        proc = self._process(w.pid)
                        with proc.oneshot():
                            times = proc.cpu_times()
                            seconds = times.user + times.system
                            resident = proc.memory_info().rss
                track = self._cpu.setdefault(w.index, _CpuTrack())
                cpu.add_metric([str(w.index)], track.update(w.pid, seconds))
                if resident is not None:
                    rss.add_metric([str(w.index)], resident)
            live = {w.pid for w in stats.workers}
            for pid in [p for p in self._procs if p not in live]:
                del self._procs[pid]
        yield cpu
        yield rss

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = psutil.Process(pid)
        return proc


def _event_families(stats: EngineStatistics) -> Iterator[Metric]:
    raised = CounterMetricFamily(
        PREFIX + "events_raised_total",
        "Events raised by the producer (accepted, oversize, or dropped).",
        labels=["event"],
    )
    oversize = CounterMetricFamily(
        PREFIX + "oversize_rejections_total",
        "Events rejected before queueing because the payload exceeds 65457 bytes.",
        labels=["event"],
    )
    for name in sorted(stats.events_raised):
        raised.add_metric([name], stats.events_raised[name])
        oversize.add_metric([name], stats.events_oversize.get(name, 0))
    yield raised
    yield oversize
    yield CounterMetricFamily(
        PREFIX + "events_queued_total",
        "Events appended to the ring of every worker holding a subscriber of them.",
        value=stats.events_queued,
    )
    drops = CounterMetricFamily(
        PREFIX + "drops_total",
        "Events not queued, by reason: ring_full (a worker ring had no room), "
        "no_subscribers (nobody subscribed).",
        labels=["reason"],
    )
    for reason in dict.fromkeys((*DROP_REASONS, *stats.drops)):
        drops.add_metric([reason], stats.drops.get(reason, 0))
    yield drops
    sent = CounterMetricFamily(
        PREFIX + "datagrams_sent_total",
        "Datagrams handed to the kernel by the workers.",
        labels=["event", "transport"],
    )
    sent_bytes = CounterMetricFamily(
        PREFIX + "sent_bytes_total",
        "Payload bytes of the datagrams handed to the kernel.",
        labels=["event", "transport"],
    )
    for (name, transport), (n, b) in sorted(stats.sent_by_event().items()):
        sent.add_metric([name, transport], n)
        sent_bytes.add_metric([name, transport], b)
    yield sent
    yield sent_bytes
    failures = CounterMetricFamily(
        PREFIX + "send_failures_total",
        "Datagrams whose send failed, by transport and reason (errno).",
        labels=["transport", "reason"],
    )
    for transport in TRANSPORTS:
        for reason in REASONS:
            n = sum(w.failures.get((transport, reason), 0) for w in stats.workers)
            failures.add_metric([transport, reason], n)
    yield failures
    stale = CounterMetricFamily(
        PREFIX + "stale_datagrams_total",
        "Datagrams not sent because their event was older than engine.max_delay_ms "
        "when a worker reached it (dropped for all its subscribers, never sent late).",
        labels=["event"],
    )
    for name, n in sorted(stats.stale_by_event().items()):
        stale.add_metric([name], n)
    yield stale
    filtered = CounterMetricFamily(
        PREFIX + "filtered_datagrams_total",
        "Datagrams not sent because the subscription's filter did not match the event "
        "(docs/routing.md).",
        labels=["event"],
    )
    for name, n in sorted(stats.filtered_by_event().items()):
        filtered.add_metric([name], n)
    yield filtered


# (gauge?, name, help, value of one worker)
_WORKER_SERIES: Final[tuple[tuple[bool, str, str, Callable[[WorkerStatistics], int]], ...]] = (
    (
        True,
        "ring_used_bytes",
        "Bytes in the worker's ring not yet consumed.",
        lambda w: w.ring.used_bytes,
    ),
    (True, "ring_capacity_bytes", "Data bytes of the worker's ring.", lambda w: w.ring.capacity),
    (
        False,
        "worker_restarts_total",
        "Times the supervisor restarted the worker.",
        lambda w: w.restarts,
    ),
    (
        False,
        "pairs_queued_total",
        "(event, subscriber) pairs appended to the worker's ring.",
        lambda w: w.pairs_queued,
    ),
    (
        False,
        "pairs_dropped_total",
        "(event, subscriber) pairs lost because the worker's ring was full.",
        lambda w: w.pairs_dropped,
    ),
    (
        False,
        "pairs_sent_total",
        "(event, subscriber) pairs the worker sent.",
        lambda w: w.pairs_sent,
    ),
    (
        False,
        "pairs_failed_total",
        "(event, subscriber) pairs whose send failed (any reason).",
        lambda w: w.pairs_failed,
    ),
    (
        False,
        "pairs_stale_total",
        "(event, subscriber) pairs dropped as stale (older than engine.max_delay_ms).",
        lambda w: w.pairs_stale,
    ),
    (
        False,
        "worker_sleeps_total",
        "Times the worker went to sleep until woken (idle; no CPU while asleep).",
        lambda w: w.sleeps,
    ),
    (
        False,
        "worker_lost_wakeups_total",
        "Times the supervisor woke the worker, asleep with records waiting (expected 0).",
        lambda w: w.lost_wakeups,
    ),
    (
        True,
        "pairs_in_ring",
        "(event, subscriber) pairs in the worker's ring, not yet sent or failed.",
        lambda w: w.pairs_in_ring,
    ),
    (
        False,
        "redelivered_pairs_total",
        "Pairs of a batch in flight when its worker died, sent again by its successor.",
        lambda w: w.redelivered_pairs,
    ),
    (True, "worker_subscribers", "Subscriber sockets the worker holds.", lambda w: w.subscribers),
    (
        False,
        "pairs_filtered_total",
        "(event, subscriber) pairs not sent: the subscription's filter did not match.",
        lambda w: w.pairs_filtered,
    ),
    (
        False,
        "failovers_total",
        "Datagrams a failed group member passed on to another member at once.",
        lambda w: w.failovers,
    ),
)


# One table per kind of source: (kind, name, help, value). A gauge or counter takes
# value(source), a number, or None for no sample; a counter by reason takes a dict.
GAUGE, COUNTER, BY_REASON = "gauge", "counter", "by_reason"
_SourceSeries = tuple[tuple[str, str, str, Callable[[SourceStatistics], Any]], ...]

_INGEST_SERIES: Final[_SourceSeries] = (
    (COUNTER, "ingest_datagrams_total", "Datagrams read from an ingest socket.",
     lambda s: s.received),
    (COUNTER, "ingest_events_raised_total",
     "Ingested notifications raised (with their own bytes) to the subscribers.",
     lambda s: s.raised),
    (BY_REASON, "ingest_rejected_total",
     "Ingested datagrams not forwarded, by reason (malformed, unknown_event, oversize, "
     "source_not_allowed, engine_stopped).",
     lambda s: s.rejected),
    (COUNTER, "ingest_kernel_drops_total",
     "Datagrams the kernel dropped at a full ingest socket (SO_RXQ_OVFL).",
     lambda s: s.kernel_drops),
    (BY_REASON, "ingest_errors_total",
     "Failures reading an ingest socket, by reason (receive_failed, internal, "
     "thread_died); the socket is read again with back-off.",
     lambda s: s.errors),
)  # fmt: skip
_UPSTREAM_SERIES: Final[_SourceSeries] = (
    (GAUGE, "upstream_up",
     "1 while every event asked for is subscribed at the upstream MI, else 0.",
     lambda s: s.up or 0),
    (GAUGE, "upstream_subscribed_events", "Events this engine is subscribed to at the upstream.",
     lambda s: s.events),
    (BY_REASON, "upstream_errors_total",
     "Failed upstream MI calls, by reason (unreachable, timeout, mi_error, bad_reply, "
     "too_large), and failures of its thread (internal, thread_died).",
     lambda s: s.errors),
    (GAUGE, "upstream_refused_events",
     "Events asked of the upstream that are not taken: no event slot or a bad name "
     "here, or refused by its MI (upstream_up is 0 while this is not 0).",
     lambda s: s.refused),
)  # fmt: skip
_AMQP_SERIES: Final[_SourceSeries] = (  # broker sources per queue (SPEC section 9)
    (GAUGE, "amqp_up", "1 while connected and consuming from the broker, else 0.",
     lambda s: s.up or 0),
    (COUNTER, "amqp_messages_total", "Messages consumed from the broker queue.",
     lambda s: s.received),
    (COUNTER, "amqp_events_raised_total",
     "Consumed notifications raised (with their own bytes) to the subscribers.",
     lambda s: s.raised),
    (BY_REASON, "amqp_rejected_total",
     "Consumed messages not forwarded, by reason (malformed, unknown_event, oversize, "
     "engine_stopped, stale).",
     lambda s: s.rejected),
    (COUNTER, "amqp_reconnects_total", "Connections made again after one was lost.",
     lambda s: s.reconnects),
    (BY_REASON, "amqp_errors_total",
     "Broker failures, by reason (connect_failed, connection_lost, exchange_missing, "
     "queue_refused, access_refused, internal, thread_restarted).",
     lambda s: s.errors),
    (GAUGE, "amqp_queue_messages",
     "Messages waiting in the broker queue for this engine (read every 2 s).",
     lambda s: s.lag),
)  # fmt: skip
_STREAM_SERIES: Final[_SourceSeries] = (  # stream sources (SPEC section 14)
    (GAUGE, "stream_up", "1 while subscribed to the stream, else 0.", lambda s: s.up or 0),
    (COUNTER, "stream_messages_total", "Messages read from the stream.", lambda s: s.received),
    (COUNTER, "stream_events_raised_total",
     "Stream messages raised (their data section's bytes) to the subscribers.",
     lambda s: s.raised),
    (BY_REASON, "stream_rejected_total",
     "Stream messages not forwarded, by reason (malformed, unknown_event, oversize, "
     "engine_stopped, stale, not_amqp10, no_data).",
     lambda s: s.rejected),
    (GAUGE, "stream_stored_offset",
     "The offset this engine last stored on the broker (it resumes after it).",
     lambda s: s.offset),
    (GAUGE, "stream_lag_offsets",
     "The stream's last offset minus this engine's last handled one (read every 2 s).",
     lambda s: s.lag),
    (COUNTER, "stream_missed_offsets_total",
     "Offsets retention removed before this engine read them (it continued after them).",
     lambda s: s.missed),
    (COUNTER, "stream_reconnects_total", "Subscriptions made again after one was lost.",
     lambda s: s.reconnects),
    (BY_REASON, "stream_errors_total",
     "Stream failures, by reason (connect_failed, connection_lost, declare_failed, "
     "stream_missing, stream_deleted, subscribe_failed).",
     lambda s: s.errors),
)  # fmt: skip

# Each kind of source: its series and the label naming one source.
_SOURCE_KINDS: Final = (
    ("ingest", "socket", _INGEST_SERIES),
    ("upstream", "mi", _UPSTREAM_SERIES),
    ("amqp", "source", _AMQP_SERIES),
    ("stream", "source", _STREAM_SERIES),
)


def _source_families(stats: EngineStatistics) -> Iterator[Metric]:
    """Every source (SPEC sections 8, 9, 14), one series per source of each kind:
    ingest per socket, upstreams per MI, brokers and streams per source."""
    for kind, label, series in _SOURCE_KINDS:
        sources = [s for s in stats.sources if s.kind == kind]
        for shape, name, doc, value in series:
            family: GaugeMetricFamily | CounterMetricFamily
            if shape == GAUGE:
                family = GaugeMetricFamily(PREFIX + name, doc, labels=[label])
            else:
                labels = [label, "reason"] if shape == BY_REASON else [label]
                family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for s in sources:
                sample = value(s)
                if shape == BY_REASON:
                    for reason, n in sample.items():
                        family.add_metric([s.name, reason], n)
                elif sample is not None:
                    family.add_metric([s.name], sample)
            yield family


def _guard_families(engine: Engine) -> Iterator[Metric]:
    """The control plane's refusals (engine/guards.py, docs/security-guards.md)."""
    refused, dropped, suppressed = engine.guards.snapshot()
    family = CounterMetricFamily(
        PREFIX + "self_subscriptions_refused_total",
        "Subscriptions refused because they point at one of the engine's own sockets, by"
        " origin (subscribe: MI, API or config; state: dropped at load; listener: dropped"
        " when a listener opened at their address).",
        labels=["origin"],
    )
    for origin, n in refused.items():
        family.add_metric([origin], n)
    yield family
    family = CounterMetricFamily(
        PREFIX + "mi_datagrams_dropped_total",
        "UDP MI datagrams not answered, by reason (source_not_allowed, empty, response,"
        " rate_limited).",
        labels=["reason"],
    )
    for reason, n in dropped.items():
        family.add_metric([reason], n)
    yield family
    yield CounterMetricFamily(
        PREFIX + "mi_error_replies_suppressed_total",
        "UDP MI error replies not sent: over the per-source rate limit.",
        value=suppressed,
    )


def _worker_families(stats: EngineStatistics) -> Iterator[Metric]:
    for gauge, name, doc, value in _WORKER_SERIES:
        family: GaugeMetricFamily | CounterMetricFamily
        if gauge:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
        else:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["worker"])
        for w in stats.workers:
            family.add_metric([str(w.index)], value(w))
        yield family


def _histograms(stats: EngineStatistics) -> Iterator[Metric]:
    layout = CounterLayout(stats.max_events)
    n = len(BATCH_BUCKETS) + 1
    counts = [sum(w.counters[layout.batch_base + i] for w in stats.workers) for i in range(n)]
    total = sum(w.counters[layout.batch_base + n] for w in stats.workers)
    yield HistogramMetricFamily(
        PREFIX + "batch_datagrams",
        "(event, subscriber) pairs a worker handled (sent or failed) per send round.",
        buckets=cumulative(counts, BATCH_BUCKETS),
        sum_value=total,
    )
    lat_counts, lat_ns = stats.latency_buckets()
    yield HistogramMetricFamily(
        PREFIX + "delivery_latency_seconds",
        "Time from raise_event to the end of the worker's send round carrying the event "
        "(one observation per event record a worker handled).",
        buckets=cumulative(lat_counts, LATENCY_BUCKETS_S),
        sum_value=lat_ns / 1e9,
    )


def _subscriber_families(
    stats: EngineStatistics,
    subscribers: list[tuple[str, str, str, int | None]],
    per_subscriber: bool,
) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        PREFIX + "subscribers",
        "Live subscriptions, by event and transport.",
        labels=["event", "transport"],
    )
    counts = {(name, t): 0 for name in sorted(stats.events_raised) for t in TRANSPORTS}
    for name, transport, _socket, _ttl in subscribers:
        counts[(name, transport)] = counts.get((name, transport), 0) + 1
    for (name, transport), n in counts.items():
        gauge.add_metric([name, transport], n)
    yield gauge
    if not per_subscriber:
        return
    ttl = GaugeMetricFamily(
        PREFIX + "subscriber_ttl_seconds",
        "Seconds until the subscription expires (+Inf for a subscription that never does).",
        labels=["event", "transport", "socket"],
    )
    for name, transport, socket, left in subscribers:
        ttl.add_metric([name, transport, socket], float("inf") if left is None else left)
    yield ttl


def _subscriber_counters(
    subscribers: list[tuple[str, str, str, int | None]], counts: dict[str, tuple[int, int]]
) -> Iterator[Metric]:
    """Per-subscriber datagram counters (all of a subscriber's events together)."""
    sent = CounterMetricFamily(
        PREFIX + "subscriber_datagrams_sent",
        "Datagrams handed to the kernel for this subscriber, over all its events.",
        labels=["transport", "socket"],
    )
    failed = CounterMetricFamily(
        PREFIX + "subscriber_send_failures",
        "Sends to this subscriber that failed (any reason), over all its events.",
        labels=["transport", "socket"],
    )
    transports = {socket: transport for _event, transport, socket, _ttl in subscribers}
    for socket, transport in sorted(transports.items()):
        if socket not in counts:
            continue  # no counter slot (over SUBSCRIBER_SLOTS on its worker): no series, not a 0
        n_sent, n_failed = counts[socket]
        sent.add_metric([transport, socket], n_sent)
        failed.add_metric([transport, socket], n_failed)
    yield sent
    yield failed


def _group_families(groups: list[GroupStatistics]) -> Iterator[Metric]:
    """Per ``virtual:`` group (docs/routing.md): bounded by the groups subscribed
    (each at most engine.targets.MAX_MEMBERS members)."""
    sent = CounterMetricFamily(
        PREFIX + "group_member_datagrams_total",
        "Datagrams a virtual group sent to each of its members.",
        labels=["event", "group", "member"],
    )
    failovers = CounterMetricFamily(
        PREFIX + "group_failovers_total",
        "Datagrams a failed member of the group passed on to another member.",
        labels=["event", "group"],
    )
    down = GaugeMetricFamily(
        PREFIX + "group_members_down",
        "Members the group skips until engine.failover_timeout_s (as of its last event).",
        labels=["event", "group"],
    )
    for g in groups:
        for member, n in g.sent_by_member:
            sent.add_metric([g.event, g.group, member], n)
        failovers.add_metric([g.event, g.group], g.failovers)
        down.add_metric([g.event, g.group], g.members_down)
    yield sent
    yield failovers
    yield down


HTTP_AUTH_REASONS: Final = ("missing", "malformed", "bad_credentials")
HTTP_REFUSED_REASONS: Final = ("origin", "host", "content_type")
HTTP_TLS_REASONS: Final = ("error", "timeout")


def _http_families(counters: SecurityCounters) -> Iterator[Metric]:
    """What the HTTP listeners refused (SPEC section 11), per listener ("mi",
    "metrics"), every reason from the first scrape."""
    auth, refused, tls = counters.snapshot()
    listeners = sorted(counters.listeners)
    for name, help_text, table, reasons in (
        (
            "http_auth_failures_total",
            "HTTP requests answered 401: no credentials, malformed, or wrong ones.",
            auth,
            HTTP_AUTH_REASONS,
        ),
        (
            "http_requests_refused_total",
            "HTTP requests refused before authentication: a foreign Origin (403), an "
            "unexpected Host on a loopback listener (421), a non-JSON POST /mi (415).",
            refused,
            HTTP_REFUSED_REASONS,
        ),
        (
            "http_tls_handshake_failures_total",
            "TLS handshakes that failed (error) or did not finish before the deadline (timeout).",
            tls,
            HTTP_TLS_REASONS,
        ),
    ):
        family = CounterMetricFamily(PREFIX + name, help_text, labels=["listener", "reason"])
        for listener in listeners:
            for reason in reasons:
                family.add_metric([listener, reason], table.get((listener, reason), 0))
        yield family


# -- the exposition an HTTP server serves ---------------------------------------------------
_registries: weakref.WeakKeyDictionary[Engine, tuple[CollectorRegistry, EngineCollector]] = (
    weakref.WeakKeyDictionary()
)
_registries_lock = threading.Lock()


class BuildCollector(Collector):
    """event_datagram_build_info{version,python,msgspec} 1."""

    def collect(self) -> Iterator[Metric]:
        labels = build()
        info = GaugeMetricFamily(
            PREFIX + "build_info",
            "The running version, and the Python and msgspec it runs on (always 1).",
            labels=list(labels),
        )
        info.add_metric(list(labels.values()), 1)
        yield info


class ReloadCollector(Collector):
    """Prometheus's own reload convention: did the last reload apply, and when did
    one last apply (the start counts as one). `status` has `successful` and
    `last_success` (epoch seconds): engine.cli.reload.ReloadStatus."""

    def __init__(self, status: Any) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PREFIX + "config_last_reload_successful",
            "1 when the last config reload (SIGHUP) applied everything, else 0.",
            value=1 if self.status.successful else 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "config_last_reload_success_timestamp_seconds",
            "When the config last loaded completely (the start, or a reload).",
            value=self.status.last_success,
        )


def watch_reloads(engine: Engine, status: Any) -> None:
    """Expose `status` (a ReloadStatus) on this engine's /metrics."""
    with _registries_lock:
        entry = _registries.get(engine)
    if entry is None:
        registry_for(engine)
        with _registries_lock:
            entry = _registries[engine]
    entry[0].register(ReloadCollector(status))


def registry_for(
    engine: Engine, *, per_subscriber: bool = False, http: SecurityCounters | None = None
) -> CollectorRegistry:
    """The engine's private registry (created on first use; never the global one)."""
    with _registries_lock:
        entry = _registries.get(engine)
        if entry is None:
            registry = CollectorRegistry(auto_describe=False)
            collector = EngineCollector(engine, per_subscriber=per_subscriber)
            registry.register(collector)
            registry.register(BuildCollector())
            # The main process's process_* series (the workers' are worker_*).
            ProcessCollector(registry=registry)
            _registries[engine] = entry = (registry, collector)
        entry[1].per_subscriber = per_subscriber
        if http is not None:
            entry[1].http = http
        return entry[0]


def exposition(
    engine: Engine,
    *,
    per_subscriber: bool = False,
    accept: str | None = None,
    http: SecurityCounters | None = None,
) -> tuple[bytes, str]:
    """The body and content type of `GET /metrics` for this engine.

    Args:
        engine: the running Engine to expose.
        per_subscriber: also expose per-subscriber series (`[metrics] per_subscriber`).
        accept: the request's Accept header; OpenMetrics is served when it asks for it,
            otherwise the classic text format (0.0.4).
        http: the HTTP listeners' refusal counters (engine.mi.http), exposed with the rest.
    Returns:
        (body, content type).
    """
    registry = registry_for(engine, per_subscriber=per_subscriber, http=http)
    if accept and "application/openmetrics-text" in accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
    return generate_latest(registry), CONTENT_TYPE
