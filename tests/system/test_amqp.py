"""The broker source (engine/sources/amqp.py, SPEC section 9) against a real
RabbitMQ (tests.helpers.broker), with real engines, workers and sockets.

Each test uses exchanges of its own on the session's broker, except the ones that
kill or restart a broker (`fresh_rabbitmq`).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from engine.producer import Engine
from engine.sources.amqp import AmqpConfig, AmqpSource
from engine.sources.amqp_frames import DEFAULT_MAX_BYTES
from engine.testing.broker import LocalBroker
from engine.wire import MAX_PAYLOAD, encode_notification
from tests.helpers.support import Receiver, eventually, udp_receiver

_names = itertools.count()


def unique(tag: str) -> str:
    return f"edg-test-{tag}-{time.monotonic_ns()}-{next(_names)}"


class Publisher:
    """A pika connection that publishes to one topic exchange (declared here, as
    OpenSIPS's event_rabbitmq expects it to exist)."""

    def __init__(self, url: str, exchange: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # publish() returns once the broker has it
        self.exchange = exchange
        self.channel.exchange_declare(exchange, "topic", durable=True)

    def publish(self, body: bytes, key: str = "opensips.event", properties: Any = None) -> None:
        self.channel.basic_publish(self.exchange, key, body, properties)

    def queue_exists(self, name: str) -> bool:
        channel = self.connection.channel()
        try:
            channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 405: it exists, exclusive to another connection (a consuming engine)
            assert exc.reply_code in (404, 405), exc
            return exc.reply_code == 405
        channel.close()
        return True

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@contextmanager
def consuming(
    engine: Engine, seen: list[bytes] | None = None, **config: Any
) -> Iterator[AmqpSource]:
    """An AmqpSource of `engine`, started and up; stopped afterwards. With `seen`,
    every body it hands the relay is appended to it, in order (what it parsed)."""
    source = AmqpSource(engine, AmqpConfig(**config))
    if seen is not None:
        forward = source.relay.forward_batch

        def record(datas: Any) -> None:
            seen.extend(datas)
            forward(datas)

        source.relay.forward_batch = record  # type: ignore[method-assign]
    engine.add_source(source)
    source.start()
    try:
        eventually(lambda: source.up, timeout=20, what=f"{source.name} to consume")
        yield source
    finally:
        source.stop()


def stats(source: AmqpSource) -> Any:
    return source.statistics()[0]


def notification(event: str, seq: int) -> bytes:
    return encode_notification(event, {"seq": seq, "pad": "p" * (seq % 50)})


def engine_with_receiver(
    make_engine: Callable[..., Engine], events: list[str]
) -> tuple[Engine, Receiver]:
    engine = make_engine(events, workers=1, pin=False)
    rx = udp_receiver()
    for event in events:
        engine.subscribe(event, rx.socket_text, None)
    return engine, rx


def test_two_engines_on_one_exchange_each_deliver_every_message_byte_for_byte(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange = unique("fanout")
    publisher = Publisher(rabbitmq.url, exchange)
    with ExitStack() as stack:
        sides = []
        for _ in range(2):
            engine, rx = engine_with_receiver(make_engine, ["E_A", "E_B"])
            stack.callback(rx.close)
            source = stack.enter_context(consuming(engine, url=rabbitmq.url, exchange=exchange))
            sides.append((engine, rx, source))
        queues = {source.queue_name for _, _, source in sides}
        assert len(queues) == 2 and all(q.startswith("amq.gen-") for q in queues), queues
        sent = [notification("E_A" if i % 3 else "E_B", i) for i in range(3000)]
        for body in sent:
            publisher.publish(body)
        for engine, rx, source in sides:
            got = rx.quiet(expect=len(sent))
            assert got == sent  # every message, byte for byte, in publish order
            counts = stats(source)
            assert (counts.received, counts.raised) == (3000, 3000)
            assert sum(counts.rejected.values()) == 0
            assert counts.up == 1 and counts.reconnects == 0
            engine.statistics().check_identity()
    publisher.close()


def test_routing_keys_select_the_events_an_engine_takes(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange = unique("keys")
    publisher = Publisher(rabbitmq.url, exchange)
    pike, rx_pike = engine_with_receiver(make_engine, ["E_PIKE_BLOCKED", "E_CORE_THRESHOLD"])
    every, rx_every = engine_with_receiver(make_engine, ["E_PIKE_BLOCKED", "E_CORE_THRESHOLD"])
    try:
        with (
            consuming(
                pike, url=rabbitmq.url, exchange=exchange, binding_keys=["opensips.pike.*"]
            ) as pike_source,
            consuming(every, url=rabbitmq.url, exchange=exchange, binding_keys=["opensips.#"]),
        ):
            blocked = [notification("E_PIKE_BLOCKED", i) for i in range(50)]
            threshold = [notification("E_CORE_THRESHOLD", i) for i in range(50)]
            for a, b in zip(blocked, threshold, strict=True):
                publisher.publish(a, "opensips.pike.blocked")
                publisher.publish(b, "opensips.core.threshold")
                publisher.publish(b, "elsewhere.core")  # bound by neither
            assert sorted(rx_every.quiet(expect=100)) == sorted(blocked + threshold)
            assert rx_pike.quiet(expect=50) == blocked
            assert stats(pike_source).received == 50  # the broker filtered, not us
    finally:
        rx_pike.close()
        rx_every.close()
        publisher.close()


def test_invalid_bodies_are_counted_by_reason_and_never_forwarded(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange = unique("bad")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    bad = {
        "malformed": [
            b"",
            b"not json",
            b'{"jsonrpc":"2.0","method":"E_A","params":{"x":1}',  # truncated
            b'{"jsonrpc":"2.0","method":"E_A","params":{},"id":1}',  # a request
            b'{"jsonrpc":"1.0","method":"E_A"}',
            b'{"jsonrpc":"2.0","method":7}',
            b'{"jsonrpc":"2.0","method":"E_A","params":"text"}',
            b'{"jsonrpc":"2.0","method":"E_A","params":{"s":"\xff\xfe"}}',  # not UTF-8
            b'{"jsonrpc":"2.0","method":"E_A","params":' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"jsonrpc":"2.0","method":"E_B","method":"E_A"}',  # a key twice: which event?
            b'{"jsonrpc": "2.0", "method": "E_A", "params": {}, "params": []}',
        ],
        "unknown_event": [notification("E_NOT_HERE", 1), notification("E_B", 2)],
        "oversize": [
            json.dumps(
                {"jsonrpc": "2.0", "method": "E_A", "params": {"p": "x" * MAX_PAYLOAD}}
            ).encode()
        ],
    }
    good = [notification("E_A", i) for i in range(20)]
    try:
        with consuming(engine, url=rabbitmq.url, exchange=exchange) as source:
            for i, body in enumerate(good):
                publisher.publish(body)
                for reason_bodies in bad.values():
                    if i < len(reason_bodies):
                        publisher.publish(reason_bodies[i])
            assert rx.quiet(expect=len(good)) == good
            eventually(
                lambda: stats(source).received == len(good) + sum(map(len, bad.values())),
                what="every message to be read",
            )
            counts = stats(source)
            assert counts.raised == len(good)
            assert counts.rejected == {
                "malformed": len(bad["malformed"]),
                "unknown_event": len(bad["unknown_event"]),
                "oversize": 1,
                "engine_stopped": 0,
                "stale": 0,
            }
            engine.statistics().check_identity()
            publisher.publish(good[0])  # still consuming after all that
            assert rx.quiet(expect=len(good) + 1)[-1] == good[0]
    finally:
        rx.close()
        publisher.close()


def test_messages_older_than_max_age_are_dropped_and_counted_never_delivered_late(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """Two ways to know a message's age: the time it says it was published (header
    timestamp_in_ms, or the AMQP timestamp), and, for messages without one, the
    queue's own x-message-ttl (dead-lettered into a queue we count)."""
    exchange = unique("stale")
    queue = unique("q")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    config = {"url": rabbitmq.url, "exchange": exchange, "queue": queue, "max_age_ms": 800}
    old = int(time.time() * 1000) - 5000
    try:
        with consuming(engine, **config) as source:
            fresh = [notification("E_A", i) for i in range(10)]
            for i, body in enumerate(fresh):
                publisher.publish(body)
                publisher.publish(
                    notification("E_A", 100 + i),
                    properties=pika.BasicProperties(headers={"timestamp_in_ms": old}),
                )
                publisher.publish(
                    notification("E_A", 200 + i),
                    properties=pika.BasicProperties(timestamp=old // 1000),
                )
            assert rx.quiet(expect=10) == fresh
            eventually(lambda: stats(source).received == 30, what="all 30 to be read")
            assert stats(source).rejected["stale"] == 20
        # Away: what is published now waits in the durable queue, without a timestamp,
        # longer than max_age_ms; the broker expires it, and the next engine counts it.
        waited = [notification("E_A", 300 + i) for i in range(25)]
        for body in waited:
            publisher.publish(body)
        time.sleep(1.5)
        with consuming(engine, **config) as source:
            eventually(
                lambda: stats(source).rejected["stale"] == 25,
                what="the expired messages to be counted",
            )
            publisher.publish(notification("E_A", 999))
            assert rx.quiet(expect=11)[10:] == [notification("E_A", 999)]
            counts = stats(source)
            assert (counts.received, counts.raised) == (26, 1)
            engine.statistics().check_identity()
    finally:
        rx.close()
        for name in (queue, f"{queue}.stale"):
            publisher.channel.queue_delete(name)
        publisher.close()


def test_a_stopped_engines_exclusive_queue_is_gone(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange = unique("gone")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    try:
        with consuming(engine, url=rabbitmq.url, exchange=exchange, max_age_ms=1000) as source:
            queue = source.queue_name
            assert publisher.queue_exists(queue)
            publisher.publish(notification("E_A", 1))
            assert rx.quiet(expect=1) == [notification("E_A", 1)]
        assert not publisher.queue_exists(queue)
        assert stats(source).up == 0
    finally:
        rx.close()
        publisher.close()


def test_a_missing_exchange_is_an_error_retried_until_it_exists(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange = unique("later")
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    source = AmqpSource(engine, AmqpConfig(url=rabbitmq.url, exchange=exchange))
    engine.add_source(source)
    source.start()
    try:
        eventually(
            lambda: stats(source).errors["exchange_missing"] >= 2,
            timeout=20,
            what="the missing exchange to be retried",
        )
        assert stats(source).up == 0
        publisher = Publisher(rabbitmq.url, exchange)  # declares it
        eventually(lambda: source.up, timeout=20, what="the source to consume")
        publisher.publish(notification("E_A", 5))
        assert rx.quiet(expect=1) == [notification("E_A", 5)]
        publisher.close()
    finally:
        source.stop()
        rx.close()


def test_broker_killed_and_restarted_both_engines_reconnect_and_deliver_again(
    fresh_rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    broker = fresh_rabbitmq
    exchange = unique("restart")
    publisher = Publisher(broker.url, exchange)
    with ExitStack() as stack:
        sides = []
        for _ in range(2):
            engine, rx = engine_with_receiver(make_engine, ["E_A"])
            stack.callback(rx.close)
            # declare = true: a SIGKILLed broker may forget an exchange declared
            # just before (its metadata log is written lazily); the engines declare it
            # again when they reconnect.
            source = stack.enter_context(
                consuming(engine, url=broker.url, exchange=exchange, declare=True, max_age_ms=2000)
            )
            sides.append((rx, source))
        before = [notification("E_A", i) for i in range(100)]
        for body in before:
            publisher.publish(body)
        for rx, _ in sides:
            assert rx.quiet(expect=100) == before
        broker.kill()
        for _, source in sides:
            eventually(lambda s=source: not s.up, what="the loss to be seen")  # type: ignore[misc]
        broker.start()
        for _, source in sides:
            eventually(lambda s=source: s.up, timeout=30, what="a reconnect")  # type: ignore[misc]
        publisher = Publisher(broker.url, exchange)
        after = [notification("E_A", 1000 + i) for i in range(100)]
        old = int(time.time() * 1000) - 60_000
        for body in after:
            publisher.publish(body)
            publisher.publish(  # published long ago, say, by a backlogged OpenSIPS
                notification("E_A", 5000),
                properties=pika.BasicProperties(headers={"timestamp_in_ms": old}),
            )
        for rx, source in sides:
            assert rx.quiet(expect=200) == before + after
            counts = stats(source)
            assert counts.reconnects == 1 and counts.errors["connection_lost"] == 1
            assert counts.rejected["stale"] == 100
            assert counts.received == 300
        publisher.close()


def test_a_broker_that_is_down_never_delays_start_or_stop(
    fresh_rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    broker = fresh_rabbitmq
    broker.kill()
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    exchange = unique("down")
    source = AmqpSource(engine, AmqpConfig(url=broker.url, exchange=exchange, declare=True))
    engine.add_source(source)
    started = time.monotonic()
    source.start()
    assert time.monotonic() - started < 0.5
    try:
        assert engine.raise_event("E_A", {"direct": 1}).queued  # other paths still raise
        eventually(lambda: stats(source).errors["connect_failed"] >= 2, what="retries")
        assert stats(source).up == 0
        broker.start()
        eventually(lambda: source.up, timeout=30, what="the source to connect")
        publisher = Publisher(broker.url, exchange)
        publisher.publish(notification("E_A", 1))
        assert rx.quiet(expect=2) == [encode_notification("E_A", {"direct": 1}),
                                      notification("E_A", 1)]  # fmt: skip
        publisher.close()
        broker.kill()
        eventually(lambda: not source.up, what="the loss to be seen")
    finally:
        stopping = time.monotonic()
        source.stop()
        assert time.monotonic() - stopping < 1.0
        rx.close()


@pytest.mark.parametrize("bad", ["amqp://guest:guest@127.0.0.1:1/%2F"])
def test_an_unreachable_broker_is_counted_and_the_source_stops_at_once(
    bad: str, make_engine: Callable[..., Engine]
) -> None:
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    source = AmqpSource(engine, AmqpConfig(url=bad))
    engine.add_source(source)
    source.start()
    try:
        eventually(lambda: stats(source).errors["connect_failed"] >= 1, what="a failure")
        assert "guest:guest" not in source.name
        metrics = stats(source)
        assert metrics.up == 0 and metrics.received == 0
    finally:
        stopping = time.monotonic()
        source.stop()
        assert time.monotonic() - stopping < 1.0
        rx.close()


# -- the fast path (deliveries taken off pika's frame buffer) ------------------------------------

FRAME_BODY_MAX = 131072 - 8  # the broker's default frame_max, less a frame's framing


def sized(event: str, seq: int, size: int) -> bytes:
    """A notification of exactly `size` bytes."""
    base = len(encode_notification(event, {"seq": seq, "pad": ""}))
    body = encode_notification(event, {"seq": seq, "pad": "x" * (size - base)}, limit=size)
    assert len(body) == size
    return body


def test_bodies_around_the_frame_size_arrive_whole_and_in_order(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """Bodies up to MAX_PAYLOAD are relayed; larger ones, in one body frame or split
    over several (larger than frame_max), are read whole (or skipped unread, over
    max_message_bytes), counted oversize, and the stream stays in step."""
    exchange = unique("sizes")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    valid = [100, 4000, 4096, 8200, MAX_PAYLOAD - 1, MAX_PAYLOAD]
    oversize = [MAX_PAYLOAD + 1, FRAME_BODY_MAX - 1, FRAME_BODY_MAX, FRAME_BODY_MAX + 1]
    oversize += [131072, 200_000, 2 * FRAME_BODY_MAX, 2 * FRAME_BODY_MAX + 1, 400_000]
    sizes = [valid[0], *oversize, *valid[1:], oversize[3], valid[-1], oversize[-1]]
    try:
        seen: list[bytes] = []
        with consuming(engine, seen, url=rabbitmq.url, exchange=exchange) as source:
            sent = []
            for i, size in enumerate(sizes):
                sent += [sized("E_A", i, size), notification("E_A", 1000 + i)]
                publisher.publish(sent[-2])
                publisher.publish(sent[-1])
            relayed = [body for body in sent if len(body) <= MAX_PAYLOAD]
            assert rx.quiet(expect=len(relayed)) == relayed
            # byte for byte, in order, but those over max_message_bytes (skipped unread)
            gathered = [body for body in sent if len(body) <= DEFAULT_MAX_BYTES]
            eventually(lambda: len(seen) == len(gathered), what="every message to be read")
            assert seen == gathered
            counts = stats(source)
            assert counts.received == len(sent) and counts.raised == len(relayed)
            assert counts.rejected["oversize"] == len(sent) - len(relayed)
            assert source.fast_path == "" and source.fast_deliveries == len(sent)
            engine.statistics().check_identity()
    finally:
        rx.close()
        publisher.close()


def test_properties_headers_and_timestamps_mixed_are_read_right(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange = unique("props")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    now = time.time()
    old_ms, new_ms = int(now * 1000) - 60_000, int(now * 1000) + 60_000
    variants: list[tuple[Any, bool]] = [  # (properties, stale by its own publish time)
        (None, False),
        (pika.BasicProperties(content_type="application/json", delivery_mode=2), False),
        (pika.BasicProperties(headers={"timestamp_in_ms": new_ms}), False),
        (pika.BasicProperties(headers={"timestamp_in_ms": old_ms}), True),
        (pika.BasicProperties(headers={"k": "v", "n": [1, 2], "t": {"x": True}}), False),
        (pika.BasicProperties(timestamp=new_ms // 1000), False),
        (pika.BasicProperties(timestamp=old_ms // 1000, headers={"k": "v"}), True),
        (
            pika.BasicProperties(
                content_type="application/json",
                content_encoding="utf-8",
                headers={"timestamp_in_ms": old_ms, "pad": "h" * 3000},
                delivery_mode=2,
                priority=1,
                correlation_id="c" * 255,
                reply_to="r",
                expiration="600000",
                message_id="m",
                timestamp=new_ms // 1000,  # the header, in ms, has the say
                type="t",
                user_id="guest",
                app_id="opensips",
            ),
            True,
        ),
        (pika.BasicProperties(timestamp=old_ms // 1000, priority=9, app_id="a"), True),
    ]
    try:
        with consuming(engine, url=rabbitmq.url, exchange=exchange, max_age_ms=30_000) as source:
            fresh = []
            for i in range(30 * len(variants)):
                properties, old = variants[i % len(variants)]
                body = notification("E_A", i)
                publisher.publish(body, properties=properties)
                if not old:
                    fresh.append(body)
            assert rx.quiet(expect=len(fresh)) == fresh
            total = 30 * len(variants)
            eventually(lambda: stats(source).received == total, what="all of them to be read")
            counts = stats(source)
            assert counts.rejected["stale"] == total - len(fresh)
            assert source.fast_deliveries == total
            engine.statistics().check_identity()
    finally:
        rx.close()
        publisher.close()


def test_tens_of_thousands_in_order_through_many_partial_reads(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """A queue filled ahead (the broker sends as fast as it can), then more while
    consuming; a small prefetch (frequent acks, reads ending mid-frame) and bodies
    of many sizes, so messages straddle pika's 4096-byte reads at every offset."""
    exchange, queue = unique("many"), unique("q")
    publisher = Publisher(rabbitmq.url, exchange)
    publisher.channel.queue_declare(queue, durable=True)
    publisher.channel.queue_bind(queue, exchange, "#")
    bulk = publisher.connection.channel()  # no confirms: fast
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    sent = [sized("E_A", i, 80 + (i * 37) % 900) for i in range(24_000)]
    try:
        for body in sent[:20_000]:
            bulk.basic_publish(exchange, "opensips.event", body)
        eventually(
            lambda: (
                publisher.channel.queue_declare(queue, passive=True).method.message_count == 20_000
            ),
            what="the queue to fill",
        )
        config = {"url": rabbitmq.url, "exchange": exchange, "queue": queue, "prefetch": 50}
        seen: list[bytes] = []
        with consuming(engine, seen, **config) as source:
            for body in sent[20_000:]:
                bulk.basic_publish(exchange, "opensips.event", body)
            eventually(lambda: len(seen) == len(sent), timeout=60, what="all of them")
            assert seen == sent
            assert rx.quiet(expect=len(sent)) == sent
            counts = stats(source)
            assert (counts.received, counts.raised) == (len(sent), len(sent))
            assert source.fast_deliveries == len(sent)
            engine.statistics().check_identity()
        assert publisher.channel.queue_declare(queue, passive=True).method.message_count == 0
    finally:
        rx.close()
        publisher.channel.queue_delete(queue)
        publisher.close()


def test_a_consumer_cancelled_by_the_broker_is_an_error_and_reconnects(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """The queue deleted while consumed: the broker cancels the consumer (a frame the
    fast path leaves to pika); the source counts it, reconnects, declares it again."""
    exchange, queue = unique("cancel"), unique("q")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    try:
        with consuming(engine, url=rabbitmq.url, exchange=exchange, queue=queue) as source:
            first = [notification("E_A", i) for i in range(100)]
            for body in first:
                publisher.publish(body)
            assert rx.quiet(expect=100) == first
            publisher.channel.queue_delete(queue)
            eventually(lambda: stats(source).errors["queue_refused"] == 1, what="the cancel")
            eventually(lambda: stats(source).reconnects == 1 and source.up, what="a reconnect")
            assert publisher.queue_exists(queue)
            publisher.publish(notification("E_A", 500))
            assert rx.quiet(expect=101)[100:] == [notification("E_A", 500)]
            counts = stats(source)
            assert counts.received == 101 and counts.errors["connection_lost"] == 0
            assert source.fast_deliveries == 101
            engine.statistics().check_identity()
    finally:
        rx.close()
        publisher.channel.queue_delete(queue)
        publisher.close()


def test_run_amqp_consumes_from_the_opensips_exchange(
    rabbitmq: LocalBroker, tmp_path: Path
) -> None:
    """`event-datagram run --amqp URL`, a process: the ready line names the source
    (without its credentials), and what OpenSIPS would publish reaches a subscriber."""
    publisher = Publisher(rabbitmq.url, "opensips")
    rx = udp_receiver()
    config = tmp_path / "engine.toml"
    config.write_text(
        'events = ["E_PIKE_BLOCKED"]\n'
        "[engine]\n"
        f'instance = "amqprun{os.getpid()}"\n'
        "workers = 1\n"
        "pin = false\n"
        f'runtime_dir = "{tmp_path / "run"}"\n'
        '[mi]\nhttp = ""\ndatagram = ""\n'
        "[state]\nenabled = false\n"
        f'[[subscription]]\nevent = "E_PIKE_BLOCKED"\nsocket = "{rx.socket_text}"\n'
    )
    log = tmp_path / "engine.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "run",
                "--config",
                str(config),
                "--amqp",
                rabbitmq.url,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        host = rabbitmq.url.split("@", 1)[1].split("/", 1)[0]
        ready = f"ready: amqp://{host}/%2F opensips"
        eventually(lambda: ready in log.read_text(), timeout=30, what="the ready line")
        assert "guest" not in log.read_text()
        body = notification("E_PIKE_BLOCKED", 7)

        def delivered() -> bool:  # published until the source's queue is bound
            publisher.publish(body, "E_PIKE_BLOCKED")
            return bool(rx.wait_for(1, timeout=0.2))

        eventually(delivered, timeout=30, what="a message relayed")
        assert set(rx.datagrams) == {body}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
        rx.close()
        publisher.close()
