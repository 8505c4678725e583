"""The broker source against what a hostile publisher or a broken setup gives it
(issue 19; docs/broker-hardening.md): messages of tens of megabytes, headers
thousands of tables deep, a wrong password, a broker that is down, a URL pika
refuses. Real RabbitMQ (the `rabbitmq` fixture), real engines, workers, sockets
and, for the URL, a real `event-datagram run` process.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.spec
import pytest

from engine.producer import Engine
from engine.sources.amqp import AmqpConfig, AmqpSource
from engine.sources.amqp_frames import DEFAULT_MAX_BYTES, connection_type
from engine.testing.broker import LocalBroker
from tests.helpers.support import eventually
from tests.system import test_amqp as base

LOGGER = "event_datagram.amqp"


class RawProperties(pika.spec.BasicProperties):  # type: ignore[misc]
    """Properties whose encoding is given as bytes: pika's encoder recurses, and a
    header thousands of tables deep is exactly what it cannot write."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self._encoded = encoded

    def encode(self) -> list[bytes]:
        return [self._encoded]


def field(name: bytes, kind: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + kind + value


def table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def deep_headers(depth: int, *extra: bytes) -> RawProperties:
    """Properties with only `headers`: {"n": {"n": ... {}}} `depth` tables deep, then
    the `extra` top-level fields."""
    inner = b""
    for _ in range(depth):
        inner = field(b"n", b"F", table(inner))
    return RawProperties(struct.pack(">H", 1 << 13) + table(inner + b"".join(extra)))


def queue_depth(publisher: base.Publisher, queue: str) -> int:
    channel = publisher.connection.channel()
    try:
        return int(channel.queue_declare(queue, passive=True).method.message_count)
    finally:
        channel.close()


@pytest.mark.parametrize("named", [True, False], ids=["named queue", "exclusive queue"])
def test_huge_messages_are_skipped_counted_oversize_and_the_ones_behind_delivered(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine], named: bool
) -> None:
    """10 MB and 40 MB (the fast path used to take quadratic time over them: minutes
    of CPU, missed heartbeats, the connection closed, a named queue stuck on them
    for good) then normal messages: the big ones are counted oversize and
    acknowledged, the normal ones delivered, nothing redelivered."""
    exchange = base.unique("huge")
    queue = base.unique("q") if named else ""
    publisher = base.Publisher(rabbitmq.url, exchange)
    engine, rx = base.engine_with_receiver(make_engine, ["E_A"])
    config: dict[str, Any] = {"url": rabbitmq.url, "exchange": exchange, "queue": queue}
    normal = [base.notification("E_A", i) for i in range(3)]
    limit = base.sized("E_A", 9, DEFAULT_MAX_BYTES)  # at the limit: read, then too large
    try:
        with base.consuming(engine, **config) as source:
            publisher.publish(b"\x00" * 10_000_000)
            publisher.publish(normal[0])
            publisher.publish(b"{" * 40_000_000)
            publisher.publish(limit)
            publisher.publish(normal[1])
            assert rx.quiet(expect=2, timeout=60) == normal[:2]
            counts = base.stats(source)
            assert (counts.received, counts.raised) == (5, 2)
            assert counts.rejected["oversize"] == 3  # 2 skipped unread, 1 by the relay
            assert counts.reconnects == 0 and sum(counts.errors.values()) == 0
            assert source.fast_path == "" and source.fast_deliveries == 5
            engine.statistics().check_identity()
        if named:  # acknowledged: the next engine on the queue gets only what is new
            assert queue_depth(publisher, queue) == 0
            with base.consuming(engine, **config) as source:
                publisher.publish(normal[2])
                assert rx.quiet(expect=3)[2:] == [normal[2]]
                assert base.stats(source).received == 1
    finally:
        rx.close()
        if named:
            publisher.channel.queue_delete(queue)
        publisher.close()


def test_a_header_5000_tables_deep_with_max_age_never_stops_the_source(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine]
) -> None:
    """With max_age_ms, a message's publish time is read from its headers (it used to
    go through pika's recursive decoder: RecursionError, the connection dropped and
    made again every ~0.35 s, nothing delivered). Now: read without recursion; the
    deep message is delivered (it carries no time) or counted stale (an old
    timestamp_in_ms after the deep table), and the messages behind it delivered."""
    exchange = base.unique("deep")
    queue = base.unique("q")
    publisher = base.Publisher(rabbitmq.url, exchange)
    engine, rx = base.engine_with_receiver(make_engine, ["E_A"])
    config = {"url": rabbitmq.url, "exchange": exchange, "queue": queue, "max_age_ms": 5000}
    old_ms = struct.pack(">q", int(time.time() * 1000) - 60_000)
    deep = base.notification("E_A", 1)
    after = [base.notification("E_A", 2 + i) for i in range(20)]
    try:
        with base.consuming(engine, **config) as source:
            publisher.publish(deep, properties=deep_headers(5000))
            publisher.publish(
                base.notification("E_A", 99),
                properties=deep_headers(5000, field(b"timestamp_in_ms", b"l", old_ms)),
            )
            for body in after:
                publisher.publish(body)
            assert rx.quiet(expect=21) == [deep, *after]
            counts = base.stats(source)
            assert (counts.received, counts.raised, counts.rejected["stale"]) == (22, 21, 1)
            assert counts.up == 1 and counts.reconnects == 0 and sum(counts.errors.values()) == 0
            engine.statistics().check_identity()
        assert queue_depth(publisher, queue) == 0  # all acknowledged
    finally:
        rx.close()
        for name in (queue, f"{queue}.stale"):
            publisher.channel.queue_delete(name)
        publisher.close()


def warnings_of(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and name in r.getMessage()
    ]


def test_a_wrong_password_is_logged_at_once_and_once(
    rabbitmq: LocalBroker,
    make_engine: Callable[..., Engine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    engine, rx = base.engine_with_receiver(make_engine, ["E_A"])
    url = rabbitmq.url.replace(":guest@", ":not-the-password@")
    assert url != rabbitmq.url
    source = AmqpSource(engine, AmqpConfig(url=url, exchange=base.unique("pw")))
    engine.add_source(source)
    source.start()
    try:
        eventually(lambda: bool(warnings_of(caplog, source.name)), what="a line at once")
        assert base.stats(source).errors["access_refused"] >= 1
        lines = warnings_of(caplog, source.name)
        assert len(lines) == 1 and "ACCESS_REFUSED" in lines[0] and "access_refused" in lines[0]
        eventually(
            lambda: base.stats(source).errors["access_refused"] >= 3,
            timeout=30,
            what="retries",
        )
        assert warnings_of(caplog, source.name) == lines  # once per change, not per retry
        assert base.stats(source).up == 0
        assert "not-the-password" not in caplog.text
    finally:
        source.stop()
        rx.close()


def test_a_broker_down_at_start_is_logged_at_once_and_again_after_it_came_and_went(
    fresh_rabbitmq: LocalBroker,
    make_engine: Callable[..., Engine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    broker = fresh_rabbitmq
    broker.kill()
    engine, rx = base.engine_with_receiver(make_engine, ["E_A"])
    source = AmqpSource(
        engine, AmqpConfig(url=broker.url, exchange=base.unique("down"), declare=True)
    )
    engine.add_source(source)
    source.start()
    try:
        eventually(lambda: bool(warnings_of(caplog, source.name)), what="a line at once")
        first = warnings_of(caplog, source.name)
        assert len(first) == 1 and "cannot connect" in first[0]
        eventually(lambda: base.stats(source).errors["connect_failed"] >= 3, what="retries")
        assert len(warnings_of(caplog, source.name)) == 1
        broker.start()
        eventually(lambda: source.up, timeout=30, what="the source to connect")
        broker.kill()
        eventually(lambda: base.stats(source).errors["connect_failed"] >= 5, what="down again")
        eventually(lambda: len(warnings_of(caplog, source.name)) >= 3, what="the log lines")
        lost_and_down = warnings_of(caplog, source.name)[1:]  # one line each, no more
        assert ["connection lost" in lost_and_down[0], "cannot connect" in lost_and_down[1]] == [
            True,
            True,
        ], lost_and_down
        assert len(lost_and_down) == 2, lost_and_down
        assert "guest:guest" not in caplog.text
    finally:
        source.stop()
        rx.close()


def test_a_url_pika_refuses_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    """`?heartbeat=abc` used to pass the config check and kill the source's thread
    (engine ready, `up` 0, nothing counted, forever). Now `run` refuses it."""
    config = tmp_path / "engine.toml"
    config.write_text(
        'events = ["E_A"]\n'
        "[engine]\n"
        f'instance = "amqpurl{os.getpid()}"\n'
        "workers = 1\npin = false\n"
        f'runtime_dir = "{tmp_path / "run"}"\n'
        '[mi]\nhttp = ""\ndatagram = ""\n'
        "[state]\nenabled = false\n"
        '[[amqp]]\nurl = "amqp://engine:s3cret@127.0.0.1:5672/%2F?heartbeat=abc"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr
    assert "Invalid heartbeat value 'abc'" in done.stderr
    assert "`$.amqp[0].url`" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    with pytest.raises(ValueError, match=r"amqp url: .*heartbeat"):  # the API refuses it too
        AmqpSource(None, AmqpConfig(url="amqp://u:p@127.0.0.1/%2F?heartbeat=abc"))  # type: ignore[arg-type]


def test_with_plain_pika_the_limit_still_keeps_oversize_messages_from_the_relay(
    rabbitmq: LocalBroker, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pika whose read loop is not the one the fast path knows (its internals
    changed): pika parses every delivery, gathering each whole, and the source
    still counts the ones over max_message_bytes oversize, acknowledged."""
    read_loop = pika.connection.Connection._on_data_available

    def changed(self: Any, data_in: bytes) -> None:  # pika's, as a new release might be
        read_loop(self, data_in)

    monkeypatch.setattr(pika.connection.Connection, "_on_data_available", changed)
    connection_type.cache_clear()
    exchange = base.unique("plain")
    queue = base.unique("q")
    publisher = base.Publisher(rabbitmq.url, exchange)
    engine, rx = base.engine_with_receiver(make_engine, ["E_A"])
    config = {"url": rabbitmq.url, "exchange": exchange, "queue": queue, "max_message_bytes": 4096}
    small = [base.notification("E_A", i) for i in range(2)]
    try:
        with base.consuming(engine, **config) as source:
            assert "no longer uses" in source.fast_path
            publisher.publish(base.sized("E_A", 5, 5000))  # over 4096, under MAX_PAYLOAD
            publisher.publish(small[0])
            publisher.publish(b"x" * 2_000_000)
            publisher.publish(small[1])
            assert rx.quiet(expect=2) == small
            counts = base.stats(source)
            assert (counts.received, counts.raised, counts.rejected["oversize"]) == (4, 2, 2)
            assert source.fast_deliveries == 0
        assert queue_depth(publisher, queue) == 0
    finally:
        connection_type.cache_clear()  # the next source checks the real pika again
        rx.close()
        publisher.channel.queue_delete(queue)
        publisher.close()
