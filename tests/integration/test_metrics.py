"""The Prometheus exposition (engine/metrics.py) of a real engine: real workers,
real sockets, parsed with prometheus-client's own parser."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import CONTENT_TYPE, exposition
from engine.producer import Engine, RaiseResult
from engine.shm.counters import BATCH_BUCKETS, LATENCY_BUCKETS_S, REASONS, TRANSPORTS
from engine.wire import MAX_PAYLOAD, PayloadTooLarge
from tests.helpers.support import (
    Receiver,
    eventually,
    running_engine,
    settle,
    udp_receiver,
    unix_receiver,
)

Key = tuple[str, tuple[tuple[str, str], ...]]


class Scrape:
    """One parsed exposition: every sample by (name, sorted labels), plus HELP and TYPE."""

    def __init__(self, text: str) -> None:
        self.samples: dict[Key, float] = {}
        self.help: dict[str, str] = {}
        self.type: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.help[family.name] = family.documentation
            self.type[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples[("event_datagram_" + name, tuple(sorted(labels.items())))]

    def sum(self, name: str, **match: str) -> float:
        full = "event_datagram_" + name
        return sum(
            v
            for (n, labels), v in self.samples.items()
            if n == full and all(dict(labels).get(k) == m for k, m in match.items())
        )

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        full = "event_datagram_" + name
        return {labels: v for (n, labels), v in self.samples.items() if n == full}


def scrape(engine: Engine, per_subscriber: bool = False) -> Scrape:
    body, content_type = exposition(engine, per_subscriber=per_subscriber)
    assert content_type == CONTENT_TYPE
    return Scrape(body.decode())


def dead_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.contextmanager
def receivers(*made: Receiver) -> Iterator[tuple[Receiver, ...]]:
    try:
        yield made
    finally:
        for rx in made:
            rx.close()


def test_every_known_label_value_is_exposed_at_zero_from_the_start() -> None:
    with running_engine(["E_A", "E_B"], workers=2, pin=False) as engine:
        s = scrape(engine)
    for event in ("E_A", "E_B"):
        assert s.get("events_raised_total", event=event) == 0
        assert s.get("oversize_rejections_total", event=event) == 0
        for t in TRANSPORTS:
            assert s.get("datagrams_sent_total", event=event, transport=t) == 0
            assert s.get("sent_bytes_total", event=event, transport=t) == 0
            assert s.get("subscribers", event=event, transport=t) == 0
    for reason in ("ring_full", "no_subscribers"):
        assert s.get("drops_total", reason=reason) == 0
    for t in TRANSPORTS:
        for reason in REASONS:
            assert s.get("send_failures_total", transport=t, reason=reason) == 0
    for worker in ("0", "1"):
        assert s.get("ring_used_bytes", worker=worker) == 0
        assert s.get("ring_capacity_bytes", worker=worker) == 8 * 1024 * 1024
        assert s.get("worker_restarts_total", worker=worker) == 0
        assert s.get("pairs_in_ring", worker=worker) == 0
        assert s.get("worker_resident_memory_bytes", worker=worker) > 0
        assert s.get("worker_cpu_seconds_total", worker=worker) >= 0
    assert s.get("workers_alive") == 2
    assert s.get("events_queued_total") == 0
    batch = s.series("batch_datagrams_bucket")
    assert len(batch) == len(BATCH_BUCKETS) + 1 and set(batch.values()) == {0}
    latency = s.series("delivery_latency_seconds_bucket")
    assert len(latency) == len(LATENCY_BUCKETS_S) + 1 and set(latency.values()) == {0}
    assert s.type["event_datagram_batch_datagrams"] == "histogram"
    assert s.type["event_datagram_subscribers"] == "gauge"
    assert s.type["event_datagram_events_raised"] == "counter"  # the parser drops _total
    assert all(text.strip() for text in s.help.values())
    assert not any(name.startswith("event_datagram") for name in REGISTRY._names_to_collectors)
    assert not any("socket" in dict(labels) for _, labels in s.samples)


def test_the_exposed_numbers_satisfy_the_accounting_identity(tmp_path: Path) -> None:
    """A known mix: normal, oversize, to a full ring, to dead subscribers, to nobody."""
    events = ["E_NORMAL", "E_BIG", "E_FULL", "E_DEAD", "E_NONE"]
    results: list[RaiseResult] = []
    oversize = 0
    with (
        receivers(udp_receiver(), udp_receiver(), unix_receiver(tmp_path)) as rxs,
        running_engine(events, workers=2, pin=False, ring_bytes=262144) as engine,
    ):
        normal_a, normal_b, full_rx = rxs
        # The stalled worker is the one holding the E_FULL subscriber (its first socket).
        engine.subscribe("E_FULL", full_rx.socket_text)
        eventually(lambda: sum(w.subscribers for w in engine.statistics().workers) == 1)
        stalled = next(w for w in engine.statistics().workers if w.subscribers == 1)
        for rx in (normal_a, normal_b):
            engine.subscribe("E_NORMAL", rx.socket_text)
            engine.subscribe("E_BIG", rx.socket_text)
        engine.subscribe("E_DEAD", f"udp:127.0.0.1:{dead_udp_port()}")
        engine.subscribe("E_DEAD", str(tmp_path / "nobody-listens.sock"))

        for seq in range(300):
            results.append(engine.raise_event("E_NORMAL", {"seq": seq, "pad": "n" * (seq % 97)}))
            if seq % 50 == 49:
                settle(engine)  # keep each burst well inside the receivers' buffers
        for seq in range(7):
            try:
                engine.raise_event("E_BIG", {"seq": seq, "pad": "x" * MAX_PAYLOAD})
            except PayloadTooLarge:
                oversize += 1
        results.append(engine.raise_event("E_BIG", {"small": True}))  # E_BIG can also fit
        for seq in range(40):
            results.append(engine.raise_event("E_DEAD", {"seq": seq}))
            if seq % 10 == 9:
                settle(engine)  # several send rounds: a refused port fails after an ICMP error
        for seq in range(11):
            results.append(engine.raise_event("E_NONE", {"seq": seq}))
        settle(engine)

        assert stalled.pid is not None
        os.kill(stalled.pid, signal.SIGSTOP)  # its ring fills up, then drops begin
        try:
            full: list[RaiseResult] = []
            while sum(r.workers_dropped for r in full) < 25 and len(full) < 20000:
                full.append(engine.raise_event("E_FULL", {"seq": len(full), "pad": "f" * 900}))
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        results += full
        settle(engine)
        for rx in rxs:
            rx.quiet()
        s = scrape(engine)
        engine.statistics().check_identity()  # the snapshot agrees with itself too

    assert oversize == 7
    raised = {e: sum(r.event == e for r in results) for e in events}
    raised["E_BIG"] += oversize
    ring_full = sum(1 for r in results if r.workers_dropped)
    assert ring_full >= 25
    assert any(r.queued for r in full)

    # Events: raised = oversize + dropped + queued, per event name and in total.
    for e in events:
        assert s.get("events_raised_total", event=e) == raised[e]
    assert s.get("oversize_rejections_total", event="E_BIG") == 7
    assert s.sum("oversize_rejections_total") == 7
    assert s.get("drops_total", reason="no_subscribers") == 11
    assert s.get("drops_total", reason="ring_full") == ring_full
    assert s.get("events_queued_total") == sum(r.queued for r in results)
    assert s.sum("events_raised_total") == (
        s.sum("oversize_rejections_total") + s.sum("drops_total") + s.get("events_queued_total")
    )

    # Pairs, per worker: queued = sent + failed + in ring (nothing left in a ring now).
    for w in ("0", "1"):
        assert s.get("pairs_in_ring", worker=w) == 0
        assert s.get("ring_used_bytes", worker=w) == 0
        assert s.get("pairs_queued_total", worker=w) == (
            s.get("pairs_sent_total", worker=w) + s.get("pairs_failed_total", worker=w)
        )
    assert s.sum("pairs_queued_total") == sum(r.pairs for r in results)
    assert s.get("pairs_dropped_total", worker=str(stalled.index)) == ring_full
    assert s.sum("pairs_sent_total") == s.sum("datagrams_sent_total")
    assert s.sum("pairs_failed_total") == s.sum("send_failures_total")
    assert s.sum("redelivered_pairs_total") == 0

    # Against what the receivers actually got.
    for rx in (normal_a, normal_b):
        assert len(rx.datagrams) == raised["E_NORMAL"] + 1  # and the one small E_BIG
    normal = [d for d in normal_a.datagrams + normal_b.datagrams if b"E_NORMAL" in d]
    big = [d for d in normal_a.datagrams + normal_b.datagrams if b"E_BIG" in d]
    assert s.get("datagrams_sent_total", event="E_NORMAL", transport="udp") == len(normal) == 600
    assert s.get("sent_bytes_total", event="E_NORMAL", transport="udp") == sum(map(len, normal))
    assert s.get("datagrams_sent_total", event="E_BIG", transport="udp") == len(big) == 2
    assert s.get("sent_bytes_total", event="E_BIG", transport="udp") == sum(map(len, big))
    # A UNIX receiver loses nothing silently: what it lacks was counted as a failure.
    full_sent = s.get("datagrams_sent_total", event="E_FULL", transport="unix")
    assert full_sent == len(full_rx.datagrams) > 0
    assert s.get("sent_bytes_total", event="E_FULL", transport="unix") == sum(
        map(len, full_rx.datagrams)
    )
    assert full_sent + s.sum("send_failures_total", transport="unix", reason="eagain") == sum(
        r.pairs for r in full
    )
    # Dead subscribers: every send to the missing path fails with ENOENT; a closed
    # UDP port refuses (the kernel reports ECONNREFUSED on the send after an ICMP error).
    assert s.get("send_failures_total", transport="unix", reason="enoent") == 40
    dead_udp_failed = s.sum("send_failures_total", transport="udp")
    assert s.get("send_failures_total", transport="udp", reason="econnrefused") > 0
    assert s.get("datagrams_sent_total", event="E_DEAD", transport="udp") + dead_udp_failed == 40
    assert s.get("datagrams_sent_total", event="E_DEAD", transport="unix") == 0
    for e in ("E_NONE", "E_FULL"):
        assert s.get("datagrams_sent_total", event=e, transport="udp") == 0

    # Histograms: cumulative buckets; one latency observation per event record sent,
    # one batch observation per send round, summing to the pairs handled.
    records = sum(r.workers_queued for r in results)
    assert s.get("delivery_latency_seconds_count") == records
    assert s.get("delivery_latency_seconds_bucket", le="+Inf") == records
    assert s.get("delivery_latency_seconds_sum") > 0
    assert s.get("batch_datagrams_sum") == s.sum("pairs_sent_total") + s.sum("pairs_failed_total")
    for prefix in ("batch_datagrams", "delivery_latency_seconds"):
        buckets = [v for (n, _), v in s.samples.items() if n == f"event_datagram_{prefix}_bucket"]
        assert buckets == sorted(buckets)
        assert buckets[-1] == s.get(f"{prefix}_count")

    # The subscribers gauge, from the registry.
    assert s.get("subscribers", event="E_NORMAL", transport="udp") == 2
    assert s.get("subscribers", event="E_DEAD", transport="udp") == 1
    assert s.get("subscribers", event="E_DEAD", transport="unix") == 1
    assert s.get("subscribers", event="E_FULL", transport="unix") == 1
    assert s.get("subscribers", event="E_NONE", transport="udp") == 0
    assert s.sum("worker_subscribers") == 5  # distinct sockets over both workers


def test_counters_never_go_backwards_across_a_worker_kill() -> None:
    with (
        receivers(udp_receiver(), udp_receiver()) as rxs,
        running_engine(["E_TEST"], workers=2, pin=False) as engine,
    ):
        for rx in rxs:
            engine.subscribe("E_TEST", rx.socket_text)
        stop = threading.Event()

        def produce() -> None:
            deadline = time.monotonic() + 20
            seq = 0
            while not stop.is_set() and time.monotonic() < deadline:
                engine.raise_event("E_TEST", {"seq": seq})
                seq += 1
                if seq % 50 == 0:
                    time.sleep(0.002)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            eventually(lambda: len(rxs[0].datagrams) > 1000, what="a stream under way")
            scrapes = [scrape(engine)]
            victim = engine.statistics().workers[0]
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            while not (engine.supervisor.ready(0) and engine.supervisor.pid_of(0) != victim.pid):
                scrapes.append(scrape(engine))  # scrapes while the worker is dead/booting
                assert len(scrapes) < 2000, "the worker was not restarted"
                time.sleep(0.005)
            eventually(lambda: len(rxs[0].datagrams) > 3000, what="the stream going on")
            scrapes.append(scrape(engine))
        finally:
            stop.set()
            producer.join(10)
        settle(engine)
        scrapes.append(scrape(engine))
        engine.statistics().check_identity()

    assert scrapes[-1].get("worker_restarts_total", worker="0") == 1
    assert scrapes[-1].get("worker_restarts_total", worker="1") == 0
    for before, after in itertools.pairwise(scrapes):
        for key, value in before.samples.items():
            name = key[0]
            monotonic = name.endswith(("_total", "_bucket", "_count", "_sum"))
            if monotonic and key in after.samples:
                assert after.samples[key] >= value, (
                    f"{key} went back: {value} -> {after.samples[key]}"
                )
    last = scrapes[-1]
    assert last.sum("pairs_sent_total") > scrapes[0].sum("pairs_sent_total")
    for w in ("0", "1"):
        assert last.get("pairs_queued_total", worker=w) == (
            last.get("pairs_sent_total", worker=w) + last.get("pairs_failed_total", worker=w)
        )


def test_per_subscriber_series_only_when_asked(tmp_path: Path) -> None:
    with (
        receivers(udp_receiver(), unix_receiver(tmp_path)) as (udp, unix),
        running_engine(["E_A"], workers=1, pin=False) as engine,
    ):
        sockets = (udp.socket_text, unix.socket_text)
        engine.subscribe("E_A", sockets[0], 120)
        engine.subscribe("E_A", sockets[1], None)
        missing = f"unix:{tmp_path / 'nobody.sock'}"
        engine.subscribe("E_A", missing, 60)
        for _ in range(5):
            engine.raise_event("E_A", {})
        udp.wait_for(5)
        unix.wait_for(5)
        settle(engine)
        plain = scrape(engine)
        detailed = scrape(engine, per_subscriber=True)
        again = scrape(engine)
    assert not plain.series("subscriber_ttl_seconds")
    assert not again.series("subscriber_ttl_seconds")
    assert not plain.series("subscriber_datagrams_sent_total")
    sent = {
        dict(labels)["socket"]: v
        for labels, v in detailed.series("subscriber_datagrams_sent_total").items()
    }
    failed = {
        dict(labels)["socket"]: v
        for labels, v in detailed.series("subscriber_send_failures_total").items()
    }
    assert sent == {sockets[0]: 5, sockets[1]: 5, missing: 0}
    assert failed == {sockets[0]: 0, sockets[1]: 0, missing: 5}
    ttl = {
        dict(labels)["socket"]: v for labels, v in detailed.series("subscriber_ttl_seconds").items()
    }
    assert set(ttl) == {*sockets, missing}
    assert 100 <= ttl[sockets[0]] <= 120
    assert ttl[sockets[1]] == float("inf")


def test_openmetrics_is_served_when_asked_for() -> None:
    with running_engine(["E_A"], workers=1, pin=False) as engine:
        engine.raise_event("E_A", {})
        body, content_type = exposition(
            engine, accept="application/openmetrics-text; version=1.0.0"
        )
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # type: ignore[no-untyped-call]
    raised = families["event_datagram_events_raised"]
    assert [(s.name, s.value) for s in raised.samples] == [
        ("event_datagram_events_raised_total", 1)
    ]


def test_a_stopped_engine_exposes_no_stale_numbers() -> None:
    with running_engine(["E_A"], workers=1, pin=False) as engine:
        pass
    s = scrape(engine)
    # The process's own series (build_info, process_*) describe the process, not the engine.
    own = {k: v for k, v in s.samples.items() if k[0].startswith("event_datagram_")}
    del own[next(k for k in own if k[0] == "event_datagram_build_info")]
    assert own == {("event_datagram_workers_alive", ()): 0}
