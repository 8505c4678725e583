"""The broker contender of `event-datagram bench --source amqp` (SPEC section 9).

Each amqp round measures what one engine consumes from one RabbitMQ queue: a
fresh engine with the same receivers as the API round, a durable queue of the
round's own bound to the exchange `edg-bench`, filled beforehand with the round's
E_BENCH notifications (`--amqp-messages`, published by this process with pika,
not timed), then an `[[amqp]]` source (engine/sources/amqp.py) started on it:
the round's window runs from the source's start until the workers have sent
everything. Reported, besides every contender's keys: messages consumed per
second, CPU us per message by role (producer = this process: the source's
thread, pika included, and the raise path; broker = the RabbitMQ processes when
the bench started the broker itself), the publish rate of the fill, and the
source's counters (received = raised + rejected). The API round of the same
round number is the comparison (`ratio_amqp_vs_api_median`).

The broker is `--amqp-url`, else a private LocalBroker that the bench starts
once (engine.testing.broker) and closes at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

from engine.bench.common import EVENT, SEQ_BASE, bench_params, make_tag
from engine.bench.live import (
    Progress,
    add_engine_loss,
    per,
    round_record,
    send_failures,
    snapshot,
    stop_engine,
    wait_drained,
)
from engine.bench.receivers import ReceiverPool, RoundSpec
from engine.errors import EventDatagramError
from engine.options import EngineOptions
from engine.producer import Engine
from engine.sources.amqp import AmqpConfig, AmqpSource
from engine.testing.broker import LocalBroker, find_rabbitmq_server
from engine.wire import encode_notification


class BenchHost(Protocol):
    """What a round needs of the bench (engine.bench.run.Bench), without importing it."""

    args: argparse.Namespace
    pool: ReceiverPool | None
    progress: Progress
    instances: list[str]
    engine: Engine | None


EXCHANGE: Final = "edg-bench"
ROUTING_KEY: Final = "opensips.E_BENCH"
CONSUME_CAP_S: Final = 300.0  # a round gives up when its queue is not read out by then
STALL_S: Final = 15.0  # ... or when nothing more was consumed for this long


class BenchBrokerError(EventDatagramError, RuntimeError):
    """No broker to run the amqp rounds against."""


class BrokerFeed:
    """The broker of the amqp rounds: --amqp-url, or one the bench starts."""

    def __init__(self, url: str | None) -> None:
        try:
            import pika  # noqa: F401
        except ImportError:
            raise BenchBrokerError(
                "--source amqp needs the amqp extra: pip install 'event-datagram[amqp]'"
            ) from None
        self.local: LocalBroker | None = None
        if url:
            self.url = url
        else:
            if find_rabbitmq_server() is None:
                raise BenchBrokerError(
                    "--source amqp: no --amqp-url given and no rabbitmq-server to start "
                    "(apt-get install rabbitmq-server)"
                )
            self.local = LocalBroker(start_timeout=120.0).start()
            self.url = self.local.url

    def broker_pids(self) -> list[int]:
        return self.local.processes() if self.local is not None else []

    def fill(self, queue: str, bodies: list[bytes]) -> float:
        """Declare `queue` (as AmqpSource declares a named one), bind it, publish
        `bodies` to it through the exchange; returns messages/s published."""
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            channel.exchange_declare(EXCHANGE, "topic", durable=True)
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, EXCHANGE, routing_key="#")
            started = time.perf_counter()
            publish = channel.basic_publish
            for body in bodies:
                publish(EXCHANGE, ROUTING_KEY, body)
            # A passive declare is a round trip: every message before it has arrived.
            while channel.queue_declare(queue, passive=True).method.message_count < len(bodies):
                time.sleep(0.05)
            return per(len(bodies), time.perf_counter() - started)
        finally:
            connection.close()

    def delete(self, queue: str) -> None:
        import pika

        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
        except Exception:  # best effort: the broker may be gone
            return
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None


def amqp_round(bench: BenchHost, feed: BrokerFeed, number: int) -> dict[str, Any]:
    """One amqp round (see the module's docstring)."""
    args = bench.args
    pool = bench.pool
    assert pool is not None
    instance = f"bench{os.getpid()}a{number}"
    bench.instances.append(instance)
    options = EngineOptions(
        instance=instance,
        workers=args.workers,
        full_ring_policy=args.full_ring_policy,
        ring_bytes=args.ring_bytes,
    )
    engine = Engine(options, events=[EVENT])
    bench.engine = engine
    phase = f"amqp round {number}"
    queue = f"edg-bench-{os.getpid()}-{number}"
    count = args.amqp_messages
    source: AmqpSource | None = None
    try:
        engine.start()
        for text in pool.sockets:
            engine.subscribe(EVENT, text)
        t0 = time.monotonic_ns()
        tag = make_tag(args.payload_bytes, t0)
        pool.begin(RoundSpec("seq", t0, tag, EVENT, SEQ_BASE))
        bench.progress.phase = f"{phase}: publishing {count:,} messages"
        bodies = [
            encode_notification(EVENT, bench_params(tag, SEQ_BASE + i, time.monotonic_ns()))
            for i in range(count)
        ]
        published_per_s = feed.fill(queue, bodies)
        del bodies
        workers = engine.statistics().workers
        worker_pids = [w.pid or 0 for w in workers]
        pids = {
            "producer": [os.getpid()],
            "workers": worker_pids,
            "receivers": pool.pids,
            "broker": feed.broker_pids(),
        }
        before = snapshot(pids, [])
        bench.progress.phase = f"{phase}: consuming"
        t_start = time.monotonic_ns()
        source = AmqpSource(
            engine, AmqpConfig(url=feed.url, exchange=EXCHANGE, queue=queue, prefetch=2000)
        )
        engine.add_source(source)
        source.start()
        t_consumed = _wait_consumed(source, count)
        pending = sum(w.pairs_in_ring for w in engine.statistics().workers)
        bench.progress.phase = f"{phase}: draining {pending:,} datagrams"
        t_drained = wait_drained(engine, max(60.0, pending / 20_000))
        stats = engine.statistics()
        counts = next(s for s in stats.sources if s.kind == "amqp")
        pool.settle(stats.pairs_sent)
        report = pool.report()
        after = snapshot(pids, [])
    finally:
        bench.engine = None
        if source is not None:
            source.stop()
        feed.delete(queue)
        stop_engine(engine, instance)
    sent = stats.pairs_sent
    failures = send_failures(stats)
    result = round_record(
        number,
        "amqp",
        report,
        before,
        after,
        t_start,
        t_consumed,
        t_drained,
        counts.raised,
        sent,
        failures,
    )
    add_engine_loss(result, stats, len(pool.sockets))
    cpu = result["cpu_s"]
    result["datagrams_per_sending_cpu_s"] = per(sent, cpu["producer"] + cpu["workers"])
    consume_s = (t_consumed - t_start) / 1e9
    result.update(
        events=counts.raised,
        events_raised=stats.raised,
        events_queued=stats.events_queued,
        drops=dict(stats.drops),
        identity_errors=stats.identity_errors(),
        subscribed=len(pool.sockets),
        worker_pids=worker_pids,
        amqp={
            "queue": queue,
            "messages_published": count,
            "messages_published_per_s": published_per_s,
            "messages_consumed": counts.received,
            "messages_consumed_per_s": per(counts.received, consume_s),
            "events_raised": counts.raised,
            "rejected": {k: v for k, v in counts.rejected.items() if v},
            "cpu_us_per_message": {role: per(1e6 * v, counts.received) for role, v in cpu.items()},
        },
    )
    return result


def _wait_consumed(source: AmqpSource, count: int) -> int:
    """Wait until the source has read `count` messages (bounded); return that time."""
    start = last_change = time.monotonic()
    last = -1
    while True:
        received = source.statistics()[0].received
        now = time.monotonic()
        if received >= count:
            return time.monotonic_ns()
        if received != last:
            last, last_change = received, now
        if now - last_change > STALL_S or now - start > CONSUME_CAP_S:
            raise BenchBrokerError(
                f"the amqp source read {received:,} of {count:,} messages "
                f"(up={source.up}, errors {source.statistics()[0].errors})"
            )
        time.sleep(0.002)


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def amqp_summary(
    rounds: list[dict[str, Any]], api_rounds: list[dict[str, Any]], side: dict[str, Any]
) -> dict[str, Any]:
    """The `amqp` block of bench.json (`side`: the keys every contender has), and the
    per-round ratios to the API round of the same number."""
    if not rounds:
        return {}
    blocks = [r["amqp"] for r in rounds]
    roles = blocks[0]["cpu_us_per_message"].keys()
    side.update(
        messages_consumed_per_s=median([b["messages_consumed_per_s"] for b in blocks]),
        messages_published_per_s=median([b["messages_published_per_s"] for b in blocks]),
        messages_consumed=sum(b["messages_consumed"] for b in blocks),
        cpu_us_per_message={
            role: median([b["cpu_us_per_message"][role] for b in blocks]) for role in roles
        },
    )
    ratios = []
    for a in rounds:
        e = next((r for r in api_rounds if r["round"] == a["round"]), None)
        if e and e["datagrams_received_per_s"]:
            ratios.append(
                {
                    "round": a["round"],
                    "amqp": a["datagrams_received_per_s"],
                    "api": e["datagrams_received_per_s"],
                    "ratio": a["datagrams_received_per_s"] / e["datagrams_received_per_s"],
                }
            )
    side["ratios_vs_api"] = ratios
    side["ratio_vs_api_median"] = median([r["ratio"] for r in ratios]) if ratios else None
    return side
