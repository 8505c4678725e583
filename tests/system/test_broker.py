"""The private RabbitMQ the tests and the bench start (engine.testing.broker.LocalBroker),
checked with a real client (pika): it carries messages, kill() leaves no process
behind, a restart keeps its port and its durable queues, two run side by side,
close() removes its directory, and a broker that cannot start says why.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pika
import pika.exceptions
import pytest

from engine.testing.broker import (
    SERVER_ENV,
    BrokerError,
    LocalBroker,
    amqp_handshake,
    find_rabbitmq_server,
)
from tests.helpers.broker import alive


def connect(broker: LocalBroker) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(broker.url))


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def publish(broker: LocalBroker, queue: str, bodies: list[bytes]) -> None:
    """Persistent messages on a durable queue, each confirmed by the broker."""
    with connect(broker) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue, durable=True)
        for body in bodies:
            channel.basic_publish(
                "", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
            )


def drain(broker: LocalBroker, queue: str) -> list[bytes]:
    got = []
    with connect(broker) as connection:
        channel = connection.channel()
        while True:
            _method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if body is None:
                return got
            got.append(body)


def test_publish_and_consume(rabbitmq: LocalBroker) -> None:
    assert rabbitmq.url == f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}/%2F"
    exchange = "edg-test-broker"  # the session's broker: "opensips" is another test's
    with connect(rabbitmq) as connection:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic")
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, exchange, routing_key="E_PIKE_BLOCKED")
        body = b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}'
        channel.basic_publish(exchange, "E_PIKE_BLOCKED", body)
        channel.basic_publish(exchange, "E_OTHER", b"not bound")
        received: list[bytes] = []

        def take(ch: object, method: object, properties: object, data: bytes) -> None:
            received.append(data)

        channel.basic_consume(queue, take, auto_ack=True)
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
        connection.process_data_events(time_limit=0.3)  # nothing else may come
    assert received == [body]


def test_kill_leaves_nothing_and_a_restart_keeps_port_and_durable_queue(
    fresh_rabbitmq: LocalBroker,
) -> None:
    broker = fresh_rabbitmq
    port, data = broker.port, broker.directory
    # A queue declared just before a SIGKILL may be lost (RabbitMQ's metadata store
    # writes its log lazily), confirmed persistent messages are not: declare it, let a
    # graceful stop write it down, then publish and kill.
    publish(broker, "durable-q", [])
    broker.stop()
    broker.start()
    publish(broker, "durable-q", [b"one", b"two", b"three"])
    pids = broker.processes()
    names = {comm(pid) for pid in pids}
    assert {"beam.smp", "epmd", "erl_child_setup"} <= names, names
    held = connect(broker)
    ports = (broker.port, broker.dist_port, broker.epmd_port)

    broker.kill()

    assert not broker.running
    assert [pid for pid in pids if alive(pid)] == []
    assert broker.processes() == []
    assert all(refused(p) for p in ports), ports
    with pytest.raises(pika.exceptions.AMQPError):
        held.channel().basic_publish("", "durable-q", b"lost")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(broker)

    broker.start()

    assert (broker.port, broker.directory) == (port, data)
    assert drain(broker, "durable-q") == [b"one", b"two", b"three"]

    # A graceful stop keeps it too, and leaves nothing either.
    publish(broker, "durable-q", [b"four"])
    pids = broker.processes()
    started = time.monotonic()
    broker.stop()
    assert time.monotonic() - started < broker.stop_timeout + 11
    assert [pid for pid in pids if alive(pid)] == []
    assert refused(port)
    broker.start()
    assert broker.port == port
    assert drain(broker, "durable-q") == [b"four"]


def test_two_brokers_at_once_do_not_collide(
    rabbitmq: LocalBroker, fresh_rabbitmq: LocalBroker
) -> None:
    one, two = rabbitmq, fresh_rabbitmq
    assert one.nodename != two.nodename
    assert (
        len({one.port, one.dist_port, one.epmd_port, two.port, two.dist_port, two.epmd_port}) == 6
    )
    assert not set(one.processes()) & set(two.processes())
    publish(two, "only-in-two", [b"x"])
    with connect(one) as connection, pytest.raises(pika.exceptions.ChannelClosedByBroker):
        connection.channel().queue_declare("only-in-two", passive=True)
    assert drain(two, "only-in-two") == [b"x"]
    two.kill()
    amqp_handshake(one.port)  # the other one is unharmed
    amqp_handshake(two.start().port)  # and the killed one comes back on its own port


def test_close_removes_its_directory(fresh_rabbitmq: LocalBroker) -> None:
    directory = fresh_rabbitmq.directory
    pids = fresh_rabbitmq.processes()
    assert directory.is_dir()
    fresh_rabbitmq.close()
    assert not directory.exists()
    assert [pid for pid in pids if alive(pid)] == []
    with pytest.raises(BrokerError, match="closed"):
        fresh_rabbitmq.start()


def test_a_broker_that_cannot_start_says_why() -> None:
    broker = LocalBroker(server="/bin/false", start_timeout=20)
    try:
        script = broker.directory / "fake-rabbitmq-server"
        script.write_text("#!/bin/sh\necho 'boom: no such broker' >&2\nexit 3\n")
        script.chmod(0o755)
        broker.server = str(script)
        with pytest.raises(BrokerError, match=r"exited with status 3[\s\S]*boom: no such broker"):
            broker.start()
        assert broker.processes() == []
    finally:
        broker.close()
    assert not broker.directory.exists()


def test_a_taken_port_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(server="/bin/false", port=port)
        try:
            with pytest.raises(BrokerError, match=f"127.0.0.1:{port} is in use"):
                broker.start()
        finally:
            broker.close()


def test_find_rabbitmq_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_ENV, "/nonexistent/rabbitmq-server")
    assert find_rabbitmq_server() is None
    monkeypatch.setenv(SERVER_ENV, "/bin/true")
    assert find_rabbitmq_server() == "/bin/true"
    monkeypatch.delenv(SERVER_ENV)
    found = find_rabbitmq_server()
    if found is not None:  # never Debian's wrapper, which would write to /var/log/rabbitmq
        assert os.access(found, os.X_OK)
        assert Path(found).resolve().name == "rabbitmq-server"
