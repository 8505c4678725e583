"""What the stream source (stream.py) asks of rstream and pika, kept apart.

- `new_consumer()`: rstream's Consumer, handing whole chunks to `on_chunk` (one
  call per chunk of messages, not one per message: no per-message context
  object), giving credit back in batches, and telling `on_gone` when the
  stream's metadata changes (deleted, or its leader moved) instead of
  re-subscribing by itself (its recovery is off: the source reconnects, from
  its own offset);
- `LagProbe`: the stream's last offset, read on a connection of its own by a
  short subscription at "last" (RabbitMQ 3.10 has no stream statistics command);
- `declare()`: exchange, stream (x-queue-type stream, retention) and bindings
  over AMQP 0-9-1 (blocking: run it in a helper thread).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

from engine.sources.stream_config import STREAM_PORT, StreamConfig, endpoint

CONNECT_TIMEOUT: Final = 5.0  # seconds for connecting, declaring, querying, subscribing
LAG_WAIT: Final = 1.0  # seconds one read of the last offset waits for the last chunk
HEARTBEAT: Final = 10  # seconds
CREDIT: Final = 32  # chunks the broker may send ahead (initial credit of a subscription)
CREDIT_BATCH: Final = 8  # chunks handled before their credit is given back, in one frame


def ignore(_message: Any, _context: Any) -> None:
    """rstream's per-message callback: never called (chunks go to on_chunk)."""


def _chunk_consumer_class() -> type[Any]:
    from rstream import Consumer

    class ChunkConsumer(Consumer):  # type: ignore[misc]
        def on_chunk(self, frame: Any) -> None:
            """Replaced per instance."""

        def on_gone(self, stream: str) -> None:
            """Replaced per instance."""

        owed = 0  # chunks handled whose credit is not given back yet

        async def _on_deliver(self, frame: Any, subscriber: Any, filter_value: Any) -> None:
            if frame.subscription_id != subscriber.subscription_id:
                return
            # Credit given back CREDIT_BATCH chunks at a time, not one frame per chunk
            # (a send per chunk was the largest cost of reading small chunks); the
            # broker still holds CREDIT - CREDIT_BATCH or more, so it never waits.
            self.owed += 1
            if self.owed >= CREDIT_BATCH:
                owed, self.owed = self.owed, 0
                await subscriber.client.credit(subscriber.subscription_id, owed)
            self.on_chunk(frame)

        async def _on_metadata_update(self, frame: Any) -> None:
            self.on_gone(frame.metadata_info.stream)

    return ChunkConsumer


def new_consumer(
    cfg: StreamConfig, name: str, on_close: Callable[[Any], Awaitable[None]] | None = None
) -> Any:
    """A chunk consumer (not started) for `cfg.url` (a resolved config: see
    StreamConfig.resolved), named `name` at the broker."""
    from rstream.recovery import BackOffRecoveryStrategy

    ep = endpoint(cfg.url, ("rabbitmq-stream", "amqp"), STREAM_PORT)
    return _chunk_consumer_class()(
        ep.host,
        ep.port,
        username=ep.username,
        password=ep.password,
        vhost=ep.vhost,
        heartbeat=HEARTBEAT,
        connection_name=name,
        recovery_strategy=BackOffRecoveryStrategy(False),
        on_close_handler=on_close,
    )


class LagProbe:
    """The stream's last offset, on a connection of its own (made on first use)."""

    def __init__(self, cfg: StreamConfig, consumer: str) -> None:
        self.cfg = cfg
        self.consumer: Any = new_consumer(cfg, f"event-datagram lag {consumer}")
        self._started = False
        self._lock = asyncio.Lock()  # one subscription at a time (lag and gap checks)

    async def tail(self) -> int | None:
        """The last offset (None: the stream is empty, or no answer in LAG_WAIT)."""
        from rstream import OffsetType

        chunk = await self._chunk(OffsetType.LAST)
        return None if chunk is None else chunk[0] + chunk[1] - 1

    async def head(self) -> int | None:
        """The first offset still in the stream (None: empty, or no answer)."""
        from rstream import OffsetType

        chunk = await self._chunk(OffsetType.FIRST)
        return None if chunk is None else chunk[0]

    async def _chunk(self, where: Any) -> tuple[int, int] | None:
        """(first offset, messages) of the chunk a subscription at `where` gets first."""
        async with self._lock:
            return await self._chunk_locked(where)

    async def _chunk_locked(self, where: Any) -> tuple[int, int] | None:
        from rstream import ConsumerOffsetSpecification

        if not self._started:
            await asyncio.wait_for(self.consumer.start(), CONNECT_TIMEOUT)
            self._started = True
        got: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

        def on_chunk(frame: Any) -> None:
            if not got.done():
                got.set_result((frame.chunk_first_offset, frame.num_records))

        self.consumer.on_chunk = on_chunk
        spec = ConsumerOffsetSpecification(where, None)
        sid = await asyncio.wait_for(
            self.consumer.subscribe(
                self.cfg.stream, ignore, decoder=None, initial_credit=1, offset_specification=spec
            ),
            CONNECT_TIMEOUT,
        )
        try:
            return await asyncio.wait_for(got, LAG_WAIT)
        except TimeoutError:
            return None
        finally:
            await asyncio.wait_for(self.consumer.unsubscribe(sid), CONNECT_TIMEOUT)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.consumer.close(), 1.0)


def declare(cfg: StreamConfig) -> str:
    """Declare the exchange, the stream and the bindings over AMQP 0-9-1 (blocking;
    every step bounded by CONNECT_TIMEOUT). A stream that exists with other
    arguments (its retention) is kept as it is and bound: returns why ("" if not)."""
    import pika
    import pika.exceptions

    ep = cfg.declare_endpoint()
    params = pika.ConnectionParameters(
        host=ep.host,
        port=ep.port,
        virtual_host=ep.vhost,
        credentials=pika.PlainCredentials(ep.username, ep.password),
        connection_attempts=1,
        socket_timeout=CONNECT_TIMEOUT,
        stack_timeout=CONNECT_TIMEOUT,
        blocked_connection_timeout=CONNECT_TIMEOUT,
    )
    connection = pika.BlockingConnection(params)
    note = ""
    try:
        channel = connection.channel()
        if cfg.exchange:
            channel.exchange_declare(cfg.exchange, cfg.exchange_type, durable=True)
        try:
            channel.queue_declare(cfg.stream, durable=True, arguments=cfg.declare_arguments())
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: it exists, other arguments
                raise
            channel = connection.channel()
            channel.queue_declare(cfg.stream, passive=True)  # a stream? else this fails
            note = f"stream {cfg.stream!r} exists with other arguments (kept): {exc.reply_text}"
        if cfg.exchange:
            for key in cfg.binding_keys:
                channel.queue_bind(cfg.stream, cfg.exchange, routing_key=key)
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return note
