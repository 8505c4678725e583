"""CPU per message size of the broker source's delivery path, against plain pika
(docs/broker-hardening.md, "Measured"):

    python -m engine.bench.probes.amqp_sizes [--url URL] [--mb 16] [--repeat 3]

For each size it fills a queue of its own (a durable queue on the default
exchange, published untimed), then consumes it in this process and takes the
process's CPU time from the consume to the last message: once through the fast
path (pika's SelectConnection with DeliveryConnection's read loop and a
DeliveryReader, as the source uses them, the relay left out) and once through
plain pika (its own frame parsing and on_message callback). Both consume with
auto_ack, so only the reading differs. Sizes over the limit
(amqp.max_message_bytes, 262,144) are skipped by the fast path, unread; plain
pika gathers them whole. A last round publishes one 40 MB message and one small
one behind it and times them the same way.

Without --url a private RabbitMQ is started (engine.testing.broker.LocalBroker).
Prints one JSON object a line and a table; needs the amqp extra.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from engine.sources.amqp_frames import DEFAULT_MAX_BYTES, DeliveryReader, connection_type
from engine.testing.broker import LocalBroker

SIZES = (1024, 4096, 16384, 61440, 131072, DEFAULT_MAX_BYTES, 1 << 20, 10 << 20)
TIMEOUT = 300.0  # seconds for one consume at most


@contextmanager
def broker_url(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with LocalBroker(start_timeout=180) as broker:
        yield broker.url


def fill(url: str, queue: str, bodies: list[bytes]) -> None:
    """Declare `queue` and publish `bodies` to it (not timed)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish("", queue, body)
    connection.close()


def drop(url: str, queue: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_delete(queue)
    connection.close()


def consume(url: str, queue: str, count: int, fast: bool) -> dict[str, Any]:
    """Consume `count` messages of `queue`: CPU and wall seconds from the consume to
    the last message, and what was read."""
    import pika

    cls = connection_type()[0] if fast else pika.SelectConnection
    if fast and cls is pika.SelectConnection:
        raise SystemExit("this pika has not the internals the fast path uses")
    bodies: list[bytes] = []
    state: dict[str, Any] = {"seen": 0, "bytes": 0, "reader": None}

    def finish() -> None:
        state["cpu"] = time.process_time() - state["cpu0"]
        state["wall"] = time.monotonic() - state["wall0"]
        connection.close()

    def on_fast_message() -> None:  # after a read with whole messages in it
        state["seen"] = state["reader"].messages
        if state["seen"] == count:
            finish()

    def on_message(_ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        state["bytes"] += len(body)
        state["seen"] += 1
        if state["seen"] == count:
            finish()

    def on_qos(_frame: Any) -> None:
        state["cpu0"], state["wall0"] = time.process_time(), time.monotonic()
        tag = channel_box[0].basic_consume(queue, on_message, auto_ack=True)
        if fast:
            reader = DeliveryReader(
                channel_box[0].channel_number, tag.encode(), bodies, on_message=on_fast_message
            )
            state["reader"] = reader
            connection.take = reader

    channel_box: list[Any] = []

    def on_channel(channel: Any) -> None:
        channel_box.append(channel)
        channel.basic_qos(prefetch_count=1000, callback=on_qos)

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    connection = cls(
        pika.URLParameters(url),
        on_open_callback=on_open,
        on_close_callback=lambda conn, _reason: conn.ioloop.stop(),
    )
    connection.ioloop.call_later(TIMEOUT, connection.ioloop.stop)
    connection.ioloop.start()
    if "cpu" not in state:
        raise SystemExit(f"timed out: {state['seen']} of {count} messages in {TIMEOUT} s")
    reader = state["reader"]
    return {
        "cpu_s": state["cpu"],
        "wall_s": state["wall"],
        "gathered_bytes": sum(map(len, bodies)) if fast else state["bytes"],
        "oversize": reader.oversize if reader is not None else 0,
    }


def round_of(url: str, bodies: list[bytes], fast: bool) -> dict[str, Any]:
    queue = f"edg-sizes-{secrets.token_hex(4)}"
    fill(url, queue, bodies)
    try:
        return consume(url, queue, len(bodies), fast)
    finally:
        drop(url, queue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a RabbitMQ to use (default: start a private one)")
    parser.add_argument("--mb", type=float, default=16.0, help="MB published a size (16)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds a size and path (3)")
    args = parser.parse_args(argv)
    rows = []
    with broker_url(args.url) as url:
        for size in SIZES:
            count = max(2, int(args.mb * 1e6 / size))
            bodies = [bytes((65 + i % 26,)) * size for i in range(count)]
            row: dict[str, Any] = {"size": size, "messages": count}
            for path in ("fast", "pika"):
                runs = [round_of(url, bodies, path == "fast") for _ in range(args.repeat)]
                cpu = statistics.median(r["cpu_s"] for r in runs)
                row[path] = {
                    "cpu_s": round(cpu, 4),
                    "ns_per_byte": round(cpu / (size * count) * 1e9, 3),
                    "us_per_message": round(cpu / count * 1e6, 2),
                    "oversize": runs[0]["oversize"],
                }
            row["fast_vs_pika"] = round(row["fast"]["cpu_s"] / row["pika"]["cpu_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        huge = [b"{" * 40_000_000, b'{"jsonrpc":"2.0","method":"E_A","params":{}}']
        for path in ("fast", "pika"):
            runs = [round_of(url, huge, path == "fast") for _ in range(args.repeat)]
            cpu = statistics.median(r["cpu_s"] for r in runs)
            row = {"size": "40 MB + 1 small", "path": path, "cpu_s": round(cpu, 4)}
            row["oversize"] = runs[0]["oversize"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'size':>10} {'msgs':>6} {'fast ns/B':>10} {'pika ns/B':>10} {'fast/pika':>9}")
    for row in rows:
        if "fast" in row:
            print(
                f"{row['size']:>10} {row['messages']:>6} {row['fast']['ns_per_byte']:>10}"
                f" {row['pika']['ns_per_byte']:>10} {row['fast_vs_pika']:>9}"
            )
        else:
            print(f"{row['size']}: {row['path']} {row['cpu_s']} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
