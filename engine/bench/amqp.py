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

import statistics
import time
from collections.abc import Sequence
from typing import Any, Final

from engine.bench.live import (
    per,
)
from engine.errors import EventDatagramError
from engine.testing.broker import LocalBroker, find_rabbitmq_server

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
