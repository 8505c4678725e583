"""The stream source (engine/sources/stream.py, SPEC section 14) against a real
RabbitMQ with its stream plugin (tests.helpers.broker), with real engines,
workers and sockets.

Each test uses a stream and an exchange of its own on the session's broker, except
the one that restarts a broker (`fresh_rabbitmq`).
"""

from __future__ import annotations

import asyncio
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
import pytest

from engine.producer import Engine
from engine.sources.stream import StreamSource
from engine.sources.stream_config import StreamConfig
from engine.testing.broker import LocalBroker
from engine.wire import MAX_PAYLOAD, encode_notification
from tests.helpers.support import Receiver, eventually, udp_receiver
from tests.unit.test_amqp10 import section, vbin

_names = itertools.count()


def unique(tag: str) -> str:
    return f"edg-stream-{tag}-{time.monotonic_ns()}-{next(_names)}"


class Publisher:
    """What OpenSIPS's event_rabbitmq does: publish to an exchange over AMQP 0-9-1
    (with confirms: publish() returns once the broker has it)."""

    def __init__(self, url: str, exchange: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.exchange = exchange
        self.channel.exchange_declare(exchange, "topic", durable=True)

    def publish(self, body: bytes, key: str = "opensips.event") -> None:
        self.channel.basic_publish(self.exchange, key, body)

    def declare_stream(self, stream: str, **arguments: Any) -> None:
        self.channel.queue_declare(
            stream, durable=True, arguments={"x-queue-type": "stream", **arguments}
        )
        self.channel.queue_bind(stream, self.exchange, "#")

    def delete_stream(self, stream: str) -> None:
        self.channel.queue_delete(stream)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def publish_raw(broker: LocalBroker, stream: str, messages: list[bytes]) -> None:
    """Write `messages` to the stream as they are, over the stream protocol (what no
    AMQP 0-9-1 publisher can do: bytes that are not an AMQP 1.0 message)."""
    from rstream import Producer

    async def send() -> None:
        producer = Producer("127.0.0.1", broker.stream_port, username="guest", password="guest")
        await producer.start()
        try:
            for message in messages:
                await producer.send_wait(stream, message)
        finally:
            await producer.close()

    asyncio.run(send())


def config(broker: LocalBroker, stream: str, exchange: str, **options: Any) -> StreamConfig:
    options.setdefault("declare", True)
    options.setdefault("consumer", unique("c"))
    return StreamConfig(
        url=broker.stream_url,
        amqp_url=broker.url,
        stream=stream,
        exchange=exchange,
        **options,
    )


@contextmanager
def reading(
    engine: Engine, cfg: StreamConfig, wait_up: bool = True, offsets_dir: Path | None = None
) -> Iterator[StreamSource]:
    """A StreamSource of `engine`, started (and up); stopped afterwards."""
    source = StreamSource(
        engine, cfg, offsets_dir=None if offsets_dir is None else str(offsets_dir)
    )
    engine.add_source(source)
    source.start()
    try:
        if wait_up:
            eventually(lambda: source.up, timeout=30, what=f"{source.name} to consume")
        yield source
    finally:
        source.stop()


def stats(source: StreamSource) -> Any:
    return source.statistics()[0]


def notification(event: str, seq: int, size: int = 0) -> bytes:
    body = encode_notification(event, {"seq": seq, "pad": "p" * (seq % 50)})
    if size > len(body):  # a body of exactly `size` bytes
        body = encode_notification(event, {"seq": seq, "pad": "p" * (size - len(body) + seq % 50)})
    return body


def engine_with_receiver(
    make_engine: Callable[..., Engine], events: list[str]
) -> tuple[Engine, Receiver]:
    engine = make_engine(events, workers=1, pin=False)
    rx = udp_receiver()
    for event in events:
        engine.subscribe(event, rx.socket_text, None)
    return engine, rx


def test_three_engines_on_one_stream_each_deliver_every_message_byte_for_byte(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    sent = [notification("E_A" if i % 3 else "E_B", i) for i in range(3000)]
    # around the datagram limit too: 65 KB bodies, byte for byte
    sent += [notification("E_A", 3000 + i, size) for i, size in enumerate((65_000, MAX_PAYLOAD))]
    assert len(sent[-1]) == MAX_PAYLOAD
    with ExitStack() as stack:
        sides = []
        for _ in range(3):
            engine, rx = engine_with_receiver(make_engine, ["E_A", "E_B"])
            stack.callback(rx.close)
            source = stack.enter_context(reading(engine, config(rabbitmq, stream, exchange)))
            sides.append((engine, rx, source))
        for body in sent:
            publisher.publish(body)
        for engine, rx, source in sides:
            got = rx.quiet(expect=len(sent))
            assert got == sent  # every message, byte for byte, in publish order
            counts = stats(source)
            assert (counts.received, counts.raised) == (len(sent), len(sent))
            assert sum(counts.rejected.values()) == 0
            assert counts.up == 1 and counts.reconnects == 0 and counts.missed == 0
            assert sum(counts.errors.values()) == 0
            engine.statistics().check_identity()
        # the offsets are stored on the broker (when the sources stop, at the latest)
    for _engine, _rx, source in sides:  # offsets count the broker's tracking records too
        assert source.handled is not None and source.handled >= len(sent) - 1
        assert stats(source).offset == source.handled
    publisher.close()


def test_stopped_and_started_again_it_continues_after_its_offset_skipping_stale(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """Stop stores the offset; a new source with the same consumer name continues
    right after it: what was published meanwhile is delivered unless it is older
    than max_age_ms (counted stale, never delivered)."""
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    cfg = config(rabbitmq, stream, exchange, max_age_ms=1500)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    first = [notification("E_A", i) for i in range(10)]
    with reading(engine, cfg):
        for body in first:
            publisher.publish(body)
        assert rx.quiet(expect=10) == first
    old = [notification("E_A", 100 + i) for i in range(20)]
    for body in old:
        publisher.publish(body)
    time.sleep(2.0)  # they are older than max_age_ms now
    fresh = [notification("E_A", 200 + i) for i in range(5)]
    for body in fresh:
        publisher.publish(body)
    with reading(engine, cfg) as again:
        eventually(lambda: stats(again).received == 25, timeout=20, what="the backlog read")
        assert rx.quiet(expect=15) == first + fresh
        counts = stats(again)
        assert counts.rejected["stale"] == 20 and counts.raised == 5
        assert counts.offset is not None  # what it stored before (9), or since
    assert stats(again).offset == again.handled
    engine.statistics().check_identity()
    rx.close()
    publisher.close()


def test_the_offset_is_stored_by_time_when_few_messages_come(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    cfg = config(rabbitmq, stream, exchange, store_every_messages=1_000_000, store_every_ms=200)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    with reading(engine, cfg) as source:
        for seq in range(5):
            publisher.publish(notification("E_A", seq))
        assert len(rx.quiet(expect=5)) == 5
        handled = source.handled
        assert handled is not None
        # stored while the source still runs (not only when it stops)
        eventually(lambda: stats(source).offset == handled, what="the offset stored")
    rx.close()
    publisher.close()


def test_retention_exceeded_while_away_continues_from_the_first_retained(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """The broker forgets an offset retention removed; the engine's copy of it tells
    that it read the stream before: it continues at the first message retained and
    counts the gap (offsets: the broker's own records take a few too)."""
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    cfg = config(
        rabbitmq, stream, exchange, retention_max_bytes=60_000, retention_segment_bytes=20_000
    )
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    with reading(engine, cfg, offsets_dir=tmp_path) as source:
        publisher.publish(notification("E_A", 0))
        assert len(rx.quiet(expect=1)) == 1
    assert source.copy.offset == 0 and len(list(tmp_path.iterdir())) == 1
    away = [notification("E_A", 1 + i, 400) for i in range(1000)]  # 400 KB: most of it goes
    for body in away:
        publisher.publish(body)
    with reading(engine, cfg, offsets_dir=tmp_path) as again:
        eventually(lambda: stats(again).missed > 0, timeout=20, what="the gap counted")
        got = rx.quiet(expect=2)[1:]
        assert 0 < len(got) < len(away)
        assert got == away[len(away) - len(got) :]  # the retained ones, in order, none twice
        lost = len(away) - len(got)  # the offsets missed: those messages, and the
        assert lost <= stats(again).missed <= lost + lost // 10  # broker's own records
    rx.close()
    publisher.close()


def test_hostile_messages_are_counted_and_skipped(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """Written straight to the stream: not AMQP 1.0, no data section, huge; and the
    broker source's poison list inside valid data sections."""
    stream = unique("s")
    publisher = Publisher(rabbitmq.url, unique("x"))
    publisher.declare_stream(stream)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    good = [notification("E_A", i) for i in range(10)]
    hostile = {
        "not_amqp10": [
            b"not amqp",
            good[0],  # a JSON body without its AMQP 1.0 framing
            section(0x75, b"\xb0\xff\xff\xff\xff" + b"x" * 10),  # a huge declared size
            section(0x75, vbin(good[0]))[:-3],  # truncated
            section(0x42, vbin(good[0])),  # a wrong descriptor
        ],
        "no_data": [section(0x77, b"\xa1\x03abc"), section(0x73, b"\x45")],
        "malformed": [
            section(0x75, vbin(b)) for b in (b"", b"not json", b'{"jsonrpc":"1.0","method":"E_A"}')
        ],
        "unknown_event": [section(0x75, vbin(notification("E_NOT_HERE", 1)))],
        "oversize": [
            section(0x75, vbin(json.dumps(
                {"jsonrpc": "2.0", "method": "E_A", "params": {"p": "x" * MAX_PAYLOAD}}
            ).encode()))
        ],
    }  # fmt: skip
    messages = []
    for i, body in enumerate(good):
        messages.append(section(0x75, vbin(body)))
        for bad in hostile.values():
            if i < len(bad):
                messages.append(bad[i])
    cfg = config(rabbitmq, stream, "", declare=False, offset="first")
    with reading(engine, cfg) as source:
        publish_raw(rabbitmq, stream, messages)
        assert rx.quiet(expect=len(good)) == good
        eventually(lambda: stats(source).received == len(messages), what="every message read")
        counts = stats(source)
        assert counts.raised == len(good)
        assert {r: n for r, n in counts.rejected.items() if n} == {
            r: len(b) for r, b in hostile.items()
        }
        assert counts.up == 1 and sum(counts.errors.values()) == 0
        publisher.publish(good[2])  # still reading after all that
        assert rx.quiet(expect=len(good) + 1)[-1] == good[2]
    engine.statistics().check_identity()
    rx.close()
    publisher.close()


def test_a_missing_stream_is_retried_and_a_deleted_one_declared_again(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    missing = config(rabbitmq, stream, exchange, declare=False)
    with reading(engine, missing, wait_up=False) as source:
        eventually(lambda: stats(source).errors["stream_missing"] >= 1, what="stream_missing")
        assert not source.up
    with reading(engine, config(rabbitmq, stream, exchange)) as source:
        publisher.publish(notification("E_A", 1))
        assert len(rx.quiet(expect=1)) == 1
        publisher.delete_stream(stream)
        eventually(lambda: stats(source).errors["stream_deleted"] == 1, what="stream_deleted")
        eventually(lambda: stats(source).reconnects == 1, timeout=30, what="declared again")
        late = notification("E_A", 2)
        publisher.publish(late)
        assert rx.quiet(expect=2)[-1] == late
    rx.close()
    publisher.close()


def test_declare_keeps_a_stream_that_exists_with_another_retention(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    publisher.channel.queue_declare(
        stream, durable=True, arguments={"x-queue-type": "stream", "x-max-age": "2h"}
    )  # not bound yet: declare binds it
    engine, rx = engine_with_receiver(make_engine, ["E_A"])
    with reading(engine, config(rabbitmq, stream, exchange, retention_max_age="1h")) as source:
        publisher.publish(notification("E_A", 1))
        assert len(rx.quiet(expect=1)) == 1
        assert stats(source).errors["declare_failed"] == 0
    rx.close()
    publisher.close()


def test_broker_restarted_engines_reconnect_and_continue_from_their_offsets(
    fresh_rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    broker = fresh_rabbitmq
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(broker.url, exchange)
    before = [notification("E_A", i) for i in range(500)]
    after = [notification("E_A", 1000 + i) for i in range(500)]
    with ExitStack() as stack:
        sides = []
        for _ in range(2):
            engine, rx = engine_with_receiver(make_engine, ["E_A"])
            stack.callback(rx.close)
            source = stack.enter_context(reading(engine, config(broker, stream, exchange)))
            sides.append((rx, source))
        for body in before:
            publisher.publish(body)
        for rx, _source in sides:
            assert rx.quiet(expect=len(before)) == before
        publisher.close()
        broker.kill()
        for _rx, source in sides:
            eventually(lambda s=source: not s.up, timeout=30, what="the loss noticed")
        broker.start()
        for _rx, source in sides:
            eventually(lambda s=source: s.up, timeout=60, what="reconnected")
        publisher = Publisher(broker.url, exchange)
        for body in after:
            publisher.publish(body)
        for rx, source in sides:
            assert rx.quiet(expect=len(before) + len(after)) == before + after  # none twice
            counts = stats(source)
            assert counts.reconnects >= 1 and counts.errors["connection_lost"] >= 1
    publisher.close()


def test_run_killed_and_restarted_resumes_from_its_stored_offset(
    rabbitmq: LocalBroker, tmp_path: Path
) -> None:
    """`event-datagram run` with a [[stream]], SIGKILLed while it relays and started
    again: every message published while it was away is delivered, and what it
    delivers twice is at most one storing interval (store_every_messages)."""
    exchange, stream = unique("x"), unique("s")
    every = 100
    publisher = Publisher(rabbitmq.url, exchange)
    rx = udp_receiver()
    path = tmp_path / "engine.toml"
    path.write_text(
        'events = ["E_A"]\n'
        f'[engine]\ninstance = "streamrun{os.getpid()}"\nworkers = 1\npin = false\n'
        f'runtime_dir = "{tmp_path / "run"}"\n'
        '[mi]\nhttp = ""\ndatagram = ""\n[state]\nenabled = false\n'
        f'[[subscription]]\nevent = "E_A"\nsocket = "{rx.socket_text}"\n'
        f'[[stream]]\nurl = "{rabbitmq.stream_url}"\namqp_url = "{rabbitmq.url}"\n'
        f'stream = "{stream}"\nexchange = "{exchange}"\ndeclare = true\n'
        f"store_every_messages = {every}\nstore_every_ms = 3600000\n"
    )
    log = tmp_path / "engine.log"

    def run() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "engine", "run", "--config", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    proc = run()
    try:
        eventually(lambda: "ready:" in log.read_text(), timeout=30, what="the ready line")
        assert "guest" not in log.read_text()
        probe = notification("E_A", 0)

        def delivered() -> bool:  # published until the source reads the stream
            publisher.publish(probe)
            return bool(rx.wait_for(1, timeout=0.2))

        eventually(delivered, timeout=30, what="a message relayed")
        rx.quiet()
        start = len(rx.datagrams)
        first = [notification("E_A", 10_000 + i) for i in range(1050)]
        for body in first:
            publisher.publish(body)
        assert rx.quiet(expect=start + len(first))[start:] == first
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
        away = [notification("E_A", 20_000 + i) for i in range(300)]
        for body in away:
            publisher.publish(body)
        mark = len(rx.datagrams)
        proc = run()
        again = rx.quiet(expect=mark + len(away), timeout=40)[mark:]
        duplicates = len(again) - len(away)
        assert again[duplicates:] == away  # every message published while it was away
        assert 0 <= duplicates <= every  # at most one storing interval again...
        assert again[:duplicates] == first[len(first) - duplicates :]  # ...the last ones
        print(f"duplicates after SIGKILL: {duplicates} (store_every_messages {every})")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
        rx.close()
        publisher.close()


@pytest.mark.parametrize("url", ["rabbitmq-stream://guest:guest@127.0.0.1:1/%2F"])
def test_an_unreachable_broker_is_counted_and_the_source_stops_at_once(
    url: str, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(["E_A"], workers=1, pin=False)
    source = StreamSource(engine, StreamConfig(url=url))
    source.start()
    try:
        eventually(lambda: stats(source).errors["connect_failed"] >= 2, what="retries counted")
        assert not source.up
    finally:
        source.stop()
    assert not source._thread.is_alive()
