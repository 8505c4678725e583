"""The stream contender of `event-datagram bench --source stream` (SPEC section 14).

Each stream round measures what one engine reads from one RabbitMQ stream, in
the shape of the amqp round (engine/bench/amqp.py): a fresh engine with the same
receivers as the API round; a stream of the round's own (x-queue-type stream,
bound to the exchange `edg-bench`), filled beforehand with the round's E_BENCH
notifications (`--amqp-messages`, published with pika over AMQP 0-9-1 as
OpenSIPS's event_rabbitmq does; not timed); then a `[[stream]]` source
(engine/sources/stream.py) started on it at offset `first`: the round's window
runs from the source's start until the workers have sent everything. Reported:
messages read per second, CPU us per message by role (producer = this process:
the source's thread, rstream and the raise path; broker = RabbitMQ), relayed
datagrams/s, and the ratio to the API round of the same number.

Once per run, `engines_scaling()`: 1, 2 and 3 consumers on the same stream
(each a real StreamSource, with a consumer name of its own) and, beside it, 1, 2
and 3 classic queues on the same exchange (each a real AmqpSource with a named
queue), while `--amqp-messages` are published: the broker's CPU per published
message for each, and what each added engine adds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

from engine.bench.amqp import EXCHANGE, ROUTING_KEY, BenchBrokerError, BrokerFeed
from engine.bench.amqp import median as _median
from engine.bench.common import EVENT
from engine.bench.live import (
    per,
    snapshot,
    stop_engine,
)
from engine.options import EngineOptions
from engine.producer import Engine
from engine.sources.amqp import AmqpConfig, AmqpSource
from engine.sources.stream import StreamSource
from engine.sources.stream_config import StreamConfig
from engine.statistics import SourceStatistics
from engine.wire import encode_notification

CONSUME_CAP_S: Final = 300.0  # a round gives up when its stream is not read out by then
STALL_S: Final = 15.0  # ... or when nothing more was read for this long
ENGINES: Final = (1, 2, 3)  # consumers of one stream (and classic queues) in engines_scaling


def stream_url(feed: BrokerFeed, given: str = "") -> str:
    """The broker's stream listener: --stream-url, the private broker's, else
    --amqp-url's host on 5552."""
    if given:
        return given
    if feed.local is not None:
        return feed.local.stream_url
    return "rabbitmq-stream" + feed.url.removeprefix("amqp").rsplit(":", 1)[0] + ":5552/%2F"


def declare_and_fill(feed: BrokerFeed, stream: str, bodies: list[bytes]) -> float:
    """Declare `stream` bound to EXCHANGE, publish `bodies` to EXCHANGE; returns
    messages/s published (publisher confirms at the end: every one is stored)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(feed.url))
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
        channel.queue_bind(stream, EXCHANGE, routing_key="#")
        return _publish(channel, bodies)
    finally:
        connection.close()


def _publish(channel: Any, bodies: list[bytes]) -> float:
    started = time.perf_counter()
    publish = channel.basic_publish
    for body in bodies:
        publish(EXCHANGE, ROUTING_KEY, body)
    channel.confirm_delivery()  # a round trip after the last: all of them have arrived
    channel.basic_publish("", "edg-bench-no-such-queue", b"")  # routed nowhere: confirmed
    return per(len(bodies), time.perf_counter() - started)


def _wait_read(read: Callable[[], SourceStatistics], count: int) -> int:
    """Wait until a source has read `count` messages (bounded); return that time."""
    start = last_change = time.monotonic()
    last = -1
    while True:
        stats = read()
        now = time.monotonic()
        if stats.received >= count:
            return time.monotonic_ns()
        if stats.received != last:
            last, last_change = stats.received, now
        if now - last_change > STALL_S or now - start > CONSUME_CAP_S:
            raise BenchBrokerError(
                f"a {stats.kind} source read {stats.received:,} of {count:,} messages "
                f"(up={stats.up}, errors {stats.errors})"
            )
        time.sleep(0.002)


def _reader(source: StreamSource | AmqpSource) -> Callable[[], SourceStatistics]:
    return lambda: source.statistics()[0]


def _broker_cpu(feed: BrokerFeed) -> float:
    cpu = snapshot({"broker": feed.broker_pids()}, [])["cpu"]["broker"]
    return float(sum(cpu))


def engines_scaling(feed: BrokerFeed, count: int, progress: Any = None) -> dict[str, Any]:
    """The broker's CPU us per published message with 1, 2 and 3 engines on one
    stream and on classic queues (one per engine), in two parts: `store` (while
    `count` messages are published to EXCHANGE, nobody reading) and `deliver`
    (while the engines read them all). A stream is filled once and read by 1, then 2,
    then 3 new consumers (the same chunks each time); classic queues are filled once
    per case (the broker stores a copy per queue). Needs the private broker (its
    processes are what is measured)."""
    if not feed.broker_pids():
        return {"skipped": "the broker is not the bench's own: its CPU cannot be measured"}
    instance = f"bench{os.getpid()}scale"
    engine = Engine(EngineOptions(instance=instance, workers=1, pin=False), events=[EVENT])
    engine.start()  # no subscribers: what the sources raise is counted dropped, no sends
    bodies = [encode_notification(EVENT, {"seq": i, "pad": "x" * 60}) for i in range(count)]
    out: dict[str, Any] = {"messages_published": count, "stream": {}, "classic": {}}
    url = stream_url(feed)
    base = f"edg-bench-scale-{os.getpid()}"

    def phase(text: str) -> None:
        if progress is not None:
            progress.phase = f"broker cost: {text}"

    def us(seconds: float) -> float:
        return per(1e6 * seconds, count)

    try:
        phase("filling a stream")
        store = _measured(feed, lambda: _fill(feed, [f"{base}-s"], bodies, stream=True))
        for n in ENGINES:
            phase(f"{n} engine(s) reading the stream")
            sources: list[Any] = [
                StreamSource(engine, StreamConfig(url=url, stream=f"{base}-s", consumer=f"e{n}{i}",
                             offset="first"), instance=instance)
                for i in range(n)
            ]  # fmt: skip
            deliver = _measured(feed, lambda s=sources: _read_all(s, count))  # type: ignore[misc]
            out["stream"][str(n)] = _costs(us(store), us(deliver))
        feed.delete(f"{base}-s")
        for n in ENGINES:
            phase(f"{n} classic queue(s)")
            queues = [f"{base}-c{n}-{i}" for i in range(n)]
            store = _measured(feed, lambda q=queues: _fill(feed, q, bodies, stream=False))  # type: ignore[misc]
            sources = [
                AmqpSource(engine, AmqpConfig(url=feed.url, exchange=EXCHANGE, queue=q,
                           prefetch=2000))
                for q in queues
            ]  # fmt: skip
            deliver = _measured(feed, lambda s=sources: _read_all(s, count))  # type: ignore[misc]
            out["classic"][str(n)] = _costs(us(store), us(deliver))
            for queue in queues:
                feed.delete(queue)
    finally:
        for name in [f"{base}-s", *(f"{base}-c{n}-{i}" for n in ENGINES for i in range(n))]:
            feed.delete(name)
        stop_engine(engine, instance)
    for kind in ("stream", "classic"):
        totals = [out[kind][str(n)]["total"] for n in ENGINES]
        out[kind]["added_per_engine_us"] = (totals[-1] - totals[0]) / (len(totals) - 1)
    return out


def _costs(store: float, deliver: float) -> dict[str, float]:
    """Broker CPU us per published message: storing it, delivering it, both."""
    return {"store": store, "deliver": deliver, "total": store + deliver}


def _measured(feed: BrokerFeed, work: Callable[[], None]) -> float:
    """The broker's CPU seconds while `work` runs."""
    before = _broker_cpu(feed)
    work()
    return _broker_cpu(feed) - before


def _fill(feed: BrokerFeed, queues: list[str], bodies: list[bytes], stream: bool) -> None:
    """Declare `queues` (streams or durable classic queues) bound to EXCHANGE, and
    publish `bodies` to EXCHANGE (confirmed at the end: all of them are stored)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(feed.url))
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        arguments = {"x-queue-type": "stream"} if stream else None
        for queue in queues:
            channel.queue_declare(queue, durable=True, arguments=arguments)
            channel.queue_bind(queue, EXCHANGE, routing_key="#")
        _publish(channel, bodies)
        for queue in queues:  # read by the next case only
            channel.queue_unbind(queue, EXCHANGE, routing_key="#")
    finally:
        connection.close()


def _read_all(sources: list[Any], count: int) -> None:
    """Start `sources`, wait until each has read `count` messages, stop them."""
    try:
        for source in sources:
            source.start()
        for source in sources:
            _wait_read(_reader(source), count)
    finally:
        for source in sources:
            source.stop()


def stream_summary(
    rounds: list[dict[str, Any]], api_rounds: list[dict[str, Any]], side: dict[str, Any]
) -> dict[str, Any]:
    """The `stream` block of bench.json, and the per-round ratios to the API round."""
    if not rounds:
        return {}
    blocks = [r["stream"] for r in rounds]
    roles = blocks[0]["cpu_us_per_message"].keys()
    side.update(
        messages_consumed_per_s=_median([b["messages_consumed_per_s"] for b in blocks]),
        messages_published_per_s=_median([b["messages_published_per_s"] for b in blocks]),
        messages_consumed=sum(b["messages_consumed"] for b in blocks),
        cpu_us_per_message={
            role: _median([b["cpu_us_per_message"][role] for b in blocks]) for role in roles
        },
    )
    ratios = []
    for s in rounds:
        e = next((r for r in api_rounds if r["round"] == s["round"]), None)
        if e and e["datagrams_received_per_s"]:
            ratio = s["datagrams_received_per_s"] / e["datagrams_received_per_s"]
            ratios.append(
                {
                    "round": s["round"],
                    "stream": s["datagrams_received_per_s"],
                    "api": e["datagrams_received_per_s"],
                    "ratio": ratio,
                }
            )
    side["ratios_vs_api"] = ratios
    side["ratio_vs_api_median"] = _median([r["ratio"] for r in ratios]) if ratios else None
    return side
