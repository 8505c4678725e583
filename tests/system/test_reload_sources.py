"""What a reload applies to a running `run` (engine.cli.reload), one kind at a time,
in process with a real engine and real sockets: the allow-list, ingest sockets,
upstreams (our own engine plays the OpenSIPS MI, as the upstream tests do) and
broker sources (a real RabbitMQ). Under load and as a process: test_service.py."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pytest

from engine import config
from engine.cli.logs import WORKER_ENV
from engine.cli.reload import ReloadStatus, reload
from engine.cli.run import Runner
from engine.errors import NotAllowed
from engine.mi.client import call
from engine.testing.broker import LocalBroker
from engine.wire import encode_notification
from tests.helpers.support import Receiver, eventually, udp_receiver, unique_instance, unix_receiver


def base_toml(tmp_path: Path, tag: str, events: list[str], mi: str = '""') -> str:
    return (
        f"events = {json.dumps(events)}\n"
        f'[engine]\ninstance = "{unique_instance(tag)}"\nworkers = 1\npin = false\n'
        f'runtime_dir = "{tmp_path / ("rt-" + tag)}"\n'
        f'[mi]\nhttp = ""\ndatagram = {mi}\n[state]\nenabled = false\n'
    )


@pytest.fixture(autouse=True)
def _logging_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A reload sets the log level (and the workers' log variable) of this process."""
    monkeypatch.delenv(WORKER_ENV, raising=False)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@contextmanager
def running(text: str) -> Iterator[Runner]:
    runner = Runner(config.loads(text, "test"), "test")
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def apply(runner: Runner, text: str) -> tuple[bool, ReloadStatus]:
    status = ReloadStatus()
    return reload(runner, lambda: config.loads(text, "test"), status), status


def test_a_narrower_allow_list_removes_subscribers_it_refuses(tmp_path: Path) -> None:
    udp, unix = udp_receiver(), unix_receiver(tmp_path)
    text = base_toml(tmp_path, "allow", ["E_A"])
    try:
        with running(f'allow = ["127.0.0.0/8", "{tmp_path}"]\n' + text) as runner:
            engine = runner.engine
            engine.subscribe("E_A", udp.socket_text, 600)
            engine.subscribe("E_A", unix.socket_text, 600)
            ok, status = apply(runner, 'allow = ["127.0.0.0/8"]\n' + text)
            assert ok and status.successful
            with engine.lock:
                left = [s.dest.key for s in engine.registry.subscribers("E_A")]
            assert left == [udp.socket_text]
            with pytest.raises(NotAllowed):
                engine.subscribe("E_A", unix.socket_text, 600)
            engine.raise_event("E_A", {"n": 1})
            assert len(udp.wait_for(1)) == 1
            assert unix.quiet() == []
    finally:
        udp.close()
        unix.close()


def listed(mi: str, event: str, sock: str) -> bool:
    result = call(mi, "subscribers_list", [event])
    return any(s["socket"] == sock for s in result["Event"].get("Subscribers", []))


def test_ingest_and_upstreams_follow_the_config(tmp_path: Path) -> None:
    """B reloads: an upstream added (it subscribes B's ingest socket at A), the
    ingest socket moved (the upstream follows it), the upstream removed (it
    unsubscribes)."""
    rx = udp_receiver()
    a_text = base_toml(tmp_path, "upa", ["E_UP"], '"127.0.0.1:0"')
    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    b_text = base_toml(tmp_path, "upb", ["E_UP"]) + (
        f'[[subscription]]\nevent = "E_UP"\nsocket = "{rx.socket_text}"\n'
    )
    first, second = (f"udp:127.0.0.1:{p}" for p in ports)
    try:
        with running(a_text) as a, running(b_text + f'[ingest]\nlisten = ["{first}"]\n') as b:
            assert a.datagram is not None
            mi = a.datagram.url
            up = f'[[upstream]]\nmi = "{mi}"\nevents = ["E_UP"]\n'
            ok, _ = apply(b, b_text + f'[ingest]\nlisten = ["{first}"]\n' + up)
            assert ok
            eventually(lambda: listed(mi, "E_UP", first), 20, "B subscribed at A")
            call(mi, "raise_event", ["E_UP", '{"n":1}'])
            assert len(rx.wait_for(1)) == 1  # A -> B's ingest -> B's subscriber
            ok, _ = apply(b, b_text + f'[ingest]\nlisten = ["{second}"]\n' + up)
            assert ok and b.ingest is not None and b.ingest.names == [second]
            eventually(lambda: listed(mi, "E_UP", second), 20, "the new socket at A")
            assert not listed(mi, "E_UP", first)  # the old upstream unsubscribed
            call(mi, "raise_event", ["E_UP", '{"n":2}'])
            assert len(rx.wait_for(2)) == 2
            ok, _ = apply(b, b_text + f'[ingest]\nlisten = ["{second}"]\n')
            assert ok and b.upstreams == []
            assert not listed(mi, "E_UP", second)
            assert [s.name for s in b.engine.statistics().sources] == [second]  # the ingest
    finally:
        rx.close()


def test_an_ingest_socket_that_cannot_bind_keeps_the_running_one(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = f"udp:127.0.0.1:{taken.getsockname()[1]}"
        text = base_toml(tmp_path, "busy", ["E_A"])
        with running(text + '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n') as runner:
            assert runner.ingest is not None
            ok, status = apply(runner, text + f'[ingest]\nlisten = ["{busy}"]\n')
            assert not ok and not status.successful
            assert runner.ingest is not None and runner.ingest.names != [busy]
            assert runner.config.ingest.listen == ["udp:127.0.0.1:0"]  # what runs


def test_ingest_sources_and_unknown_events_change_without_rebinding(tmp_path: Path) -> None:
    rx = udp_receiver()
    text = base_toml(tmp_path, "pol", ["E_A"]) + (
        f'[[subscription]]\nevent = "E_A"\nsocket = "{rx.socket_text}"\n'
        '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n'
    )
    try:
        with running(text) as runner, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            ingest = runner.ingest
            assert ingest is not None
            address = ingest.sockets[0].sock.getsockname()

            def stats() -> Any:
                return ingest.statistics()[0]

            tx.sendto(encode_notification("E_A", {"n": 1}), address)
            assert len(rx.wait_for(1)) == 1
            # listen unchanged (port 0 and all): only the policy changes
            narrowed = text.replace(
                '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n',
                '[ingest]\nlisten = ["udp:127.0.0.1:0"]\nallow = ["10.0.0.0/8"]\n'
                'unknown_events = "register"\n',
            )
            ok, _ = apply(runner, narrowed)
            assert ok and runner.ingest is ingest  # the same socket, never closed
            tx.sendto(encode_notification("E_A", {"n": 2}), address)
            eventually(lambda: stats().rejected.get("source_not_allowed") == 1, 10, "refused")
            ok, _ = apply(runner, narrowed.replace('allow = ["10.0.0.0/8"]', "allow = []"))
            assert ok and runner.ingest is ingest
            tx.sendto(encode_notification("E_NEW", {"n": 3}), address)  # registered now
            eventually(lambda: ("E_NEW", 1) in runner.engine.registry.events(), 10, "E_NEW")
            assert rx.quiet(expect=1) == [encode_notification("E_A", {"n": 1})]
    finally:
        rx.close()


def test_broker_sources_are_added_and_removed(tmp_path: Path, rabbitmq: LocalBroker) -> None:
    exchange = f"edg-reload-{unique_instance()}"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange, "topic", durable=False, auto_delete=True)
    rx: Receiver = udp_receiver()
    text = base_toml(tmp_path, "amqp", ["E_MQ"]) + (
        f'[[subscription]]\nevent = "E_MQ"\nsocket = "{rx.socket_text}"\n'
    )
    amqp = f'[[amqp]]\nurl = "{rabbitmq.url}"\nexchange = "{exchange}"\n'
    try:
        with running(text) as runner:
            ok, _ = apply(runner, text + amqp)
            assert ok and len(runner.amqp) == 1
            source = runner.amqp[0]
            eventually(lambda: source.up, 30, "the broker source to consume")
            channel.basic_publish(exchange, "k", encode_notification("E_MQ", {"n": 1}))
            assert len(rx.wait_for(1)) == 1
            ok, _ = apply(runner, text + amqp)  # unchanged: kept, not reconnected
            assert ok and runner.amqp == [source]
            ok, _ = apply(runner, text)
            assert ok and runner.amqp == []
            assert not [s for s in runner.engine.statistics().sources if "amqp" in s.name]
    finally:
        rx.close()
        connection.close()
