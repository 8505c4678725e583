"""A stream source: one RabbitMQ stream read by every engine (SPEC section 14).

A stream is a queue of x-queue-type stream bound to the exchange OpenSIPS's
event_rabbitmq publishes to. The broker stores each message once, whatever the
number of engines, and keeps it (retention by age or size); each engine reads
it over the stream protocol (rstream) under a consumer name of its own
(`[[stream]] consumer`, default ENGINE.INSTANCE@HOSTNAME), and stores on the
broker the offset of the last message it handled (server-side tracking).

One thread per `[[stream]]` with an asyncio loop of its own. Per connection:

- with `declare = true`, the exchange, the stream (its retention) and its
  bindings are declared over AMQP 0-9-1 (pika, in a helper thread, bounded by
  CONNECT_TIMEOUT); else the stream must exist ("stream_missing" until it does);
- the stored offset is queried: the subscription starts right after it (after
  the last offset handled, when this process handled more since), else at the
  configured `offset` (next, first, last, N, timestamp:MS);
- each chunk the broker delivers is one batch: its messages' bodies are taken
  from their AMQP 1.0 data section (amqp10.py; "not_amqp10" / "no_data"
  rejected and counted), a chunk stored more than max_age_ms ago is counted
  "stale" (the chunk's timestamp: when the broker wrote it), and the rest goes
  through the Relay together (validated, raised byte for byte, counted);
- after the Relay returns (the events are queued for the workers), the offset
  of the chunk's last message is stored on the broker every
  `store_every_messages` messages or `store_every_ms` after the first one not
  yet stored, and when the source stops. A SIGKILL loses at most what came
  after the last store: the restarted engine delivers those again (duplicates,
  at most one storing interval), never skips anything (the offset of a
  message that was only counted, stale or rejected, is stored all the same);
- the broker forgets an offset once retention removed what it points to, so
  the source also keeps a copy of its stored offset (a small file in
  `offsets_dir`, the engine's runtime dir): with no offset at the broker but a
  copy older than the stream's first offset, it continues at the first message
  retained, counting the offsets in between `missed` (not the messages: the
  broker's own offset-tracking records take offsets too);
- every LAG_INTERVAL a second connection reads the stream's last offset (a
  short subscription at "last": RabbitMQ 3.10 has no stream statistics
  command): lag = that minus the engine's last handled offset.

A lost connection, a deleted stream or a refused subscription ends the
session; it is made again after a back-off (BACKOFF_FIRST doubling to
BACKOFF_MAX). Errors are counted by reason and logged once per change of state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from engine.sources.amqp10 import REJECT_REASONS as AMQP10_REASONS
from engine.sources.amqp10 import NotAmqp10, body
from engine.sources.relay import SOURCE_REJECT_REASONS, Relay
from engine.sources.stream_client import (
    CONNECT_TIMEOUT,
    CREDIT,
    LagProbe,
    declare,
    ignore,
    new_consumer,
)
from engine.sources.stream_config import StreamConfig, offset_spec
from engine.sources.stream_offsets import OffsetCopy
from engine.statistics import SourceStatistics

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.stream")

STREAM_REJECT_REASONS: Final = (
    *(r for r in SOURCE_REJECT_REASONS if r != "source_not_allowed"),
    "stale",
    *AMQP10_REASONS,
)
ERROR_REASONS: Final = (
    "connect_failed",  # no connection (broker down, refused, bad credentials)
    "connection_lost",  # a connection that was up went away
    "declare_failed",  # declare = true and the exchange, stream or binding was refused
    "stream_missing",  # the stream does not exist (declare = false)
    "stream_deleted",  # the stream was deleted (or lost its leader) while read
    "subscribe_failed",  # the broker refused the subscription or the offset query
)
LAG_INTERVAL: Final = 2.0  # seconds between reads of the stream's last offset
BACKOFF_FIRST: Final = 0.25
BACKOFF_MAX: Final = 5.0
CLOSE_TIMEOUT: Final = 2.0  # seconds a session's close may take
STOP_BUDGET: Final = 4.0  # seconds stop() waits for the thread


class StreamSource:
    """One `[[stream]]`: a RabbitMQ stream read into an Engine, resuming at its offset."""

    def __init__(
        self,
        engine: Engine,
        config: StreamConfig,
        instance: str = "default",
        offsets_dir: str | None = None,
    ) -> None:
        """`offsets_dir`: where a copy of the stored offset is kept (None: nowhere)."""
        problem = config.problem()
        if problem:
            raise ValueError(f"stream {problem[0]}: {problem[1]}")
        # url_file / url_env are read once, here: a file changed later is read at
        # the next start (a [[stream]] change needs a restart anyway).
        self.config = config = config.resolved()
        self.name = config.display_name()
        self.consumer = config.consumer_name(instance)
        self.relay = Relay(
            engine, "stream", self.name, config.unknown_events, reasons=STREAM_REJECT_REASONS
        )
        self._lock = threading.Lock()  # the fields below, read by statistics()
        self._up = False
        self._reconnects = 0
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._lag: int | None = None
        self._stored: int | None = None  # the offset stored on the broker, once known
        self._missed = 0
        self._connected_once = False
        self._logged = ""  # the state last logged: "up" or an error reason
        # The thread's own (never read elsewhere but for tests):
        self.handled: int | None = None  # offset of the last message handled
        self.chunks = 0
        self.declare_noted = False  # the declare note was logged (once per source)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None  # set to end the session (stop, loss)
        self._thread = threading.Thread(target=self._run, name="edg-stream", daemon=True)
        self.copy = OffsetCopy(offsets_dir, instance, self.name, config.stream, self.consumer)

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        """Start the thread; never waits for the broker."""
        self._thread.start()

    def stop(self) -> None:
        """Store the offset handled, close (STOP_BUDGET at most)."""
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed meanwhile
                loop.call_soon_threadsafe(wake.set)
        if self._thread.ident is not None:
            self._thread.join(STOP_BUDGET)
            if self._thread.is_alive():
                log.warning("stream %s: connection still closing; not waited for", self.name)

    def statistics(self) -> list[SourceStatistics]:
        with self._lock:
            extra = {
                "up": 1 if self._up else 0,
                "errors": dict(self._errors),
                "reconnects": self._reconnects,
                "lag": self._lag,
                "offset": self._stored,
                "missed": self._missed,
            }
        return [self.relay.statistics(**extra)]

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._sessions())
        except Exception:
            log.exception("stream %s: the source's loop failed", self.name)
        finally:
            self._set_up(False)
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _sessions(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            session = _Session(self)
            try:
                await session.run()
            except Exception as exc:  # never let the source die: count, log, retry
                self._count_error("connection_lost", f"session failed: {exc!r}")
            self._set_up(False)
            if self._stop.is_set():
                break
            delay = BACKOFF_FIRST if session.consumed else min(delay * 2, BACKOFF_MAX)
            await self._sleep(delay * random.uniform(0.8, 1.2))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less when stop() comes."""
        wake = self._wake = asyncio.Event()
        if self._stop.is_set():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    # -- helpers for the session -----------------------------------------------------------

    def _set_up(self, up: bool) -> None:
        with self._lock:
            self._up = up

    def _count_error(self, reason: str, message: str) -> None:
        with self._lock:
            self._errors[reason] += 1
            self._up = False
            changed = self._logged != reason
            self._logged = reason
        if changed:  # once per change of state, not per retry
            log.warning("stream %s: %s", self.name, message)

    def _connected(self, where: str) -> None:
        with self._lock:
            if self._connected_once:
                self._reconnects += 1
            self._connected_once = True
            self._up = True
            self._logged = "up"
        log.info("stream %s: consuming as %s from %s", self.name, self.consumer, where)

    def _set_stored(self, offset: int | None) -> None:
        with self._lock:
            self._stored = offset
        if offset is not None:
            self.copy.write(offset)

    def _set_lag(self, lag: int) -> None:
        with self._lock:
            self._lag = lag

    def _add_missed(self, n: int) -> None:
        with self._lock:
            self._missed += n


class _Session:
    """One connection's life: declare, query the offset, subscribe, consume, store."""

    def __init__(self, source: StreamSource) -> None:
        self.source = source
        self.config = source.config
        self.relay = source.relay
        self.consumed = False
        self.lost = asyncio.Event()
        self.consumer: Any = None
        self.probe: Any = None
        self._next = -1  # the offset expected next (-1: any; the first subscription)
        self._resumed_at = -1  # the offset a resumed subscription asked for, until a chunk came
        self._gap_task: asyncio.Task[None] | None = None
        self._unstored = 0  # messages handled since the last store
        self._stored_at = -1
        self._max_age_ms = self.config.max_age_ms
        self._store_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        source = self.source
        source._wake = self.lost
        if source._stop.is_set():
            return
        from rstream import exceptions

        cfg = self.config
        where = cfg.display_name()
        if cfg.declare:
            try:
                note = await asyncio.wait_for(asyncio.to_thread(declare, cfg), CONNECT_TIMEOUT * 2)
                if note and not self.source.declare_noted:
                    log.warning("stream %s: %s", source.name, note)
                    self.source.declare_noted = True
            except Exception as exc:
                source._count_error("declare_failed", f"cannot declare {cfg.stream!r}: {exc!r}")
                return
        self.consumer = new_consumer(cfg, f"event-datagram {source.consumer}", self._on_closed)
        self.consumer.on_chunk = self._on_chunk
        self.consumer.on_gone = self._on_gone
        try:
            try:
                await asyncio.wait_for(self.consumer.start(), CONNECT_TIMEOUT)
            except Exception as exc:
                source._count_error("connect_failed", f"cannot connect: {exc!r}")
                return
            try:
                if not await asyncio.wait_for(
                    self.consumer.stream_exists(cfg.stream), CONNECT_TIMEOUT
                ):
                    source._count_error("stream_missing", f"stream {cfg.stream!r} does not exist")
                    return
                spec = await self._start_offset(exceptions.OffsetNotFound)
                await asyncio.wait_for(
                    self.consumer.subscribe(
                        cfg.stream, ignore, decoder=None, offset_specification=spec,
                        initial_credit=CREDIT, subscriber_name=source.consumer,
                    ),
                    CONNECT_TIMEOUT,
                )  # fmt: skip
            except Exception as exc:
                if not self.lost.is_set():
                    source._count_error("subscribe_failed", f"cannot subscribe: {exc!r}")
                return
            self.consumed = True
            source._connected(where)
            lag = asyncio.create_task(self._read_lag())
            await self.lost.wait()
            lag.cancel()
            with contextlib.suppress(BaseException):
                await lag
        finally:
            await self._close()

    async def _start_offset(self, not_found: type[Exception]) -> Any:
        """Right after the stored offset (or what this process handled since), else
        the configured start."""
        from rstream import ConsumerOffsetSpecification, OffsetType

        source = self.source
        try:
            stored: int | None = await asyncio.wait_for(
                self.consumer.query_offset(self.config.stream, source.consumer), CONNECT_TIMEOUT
            )
        except not_found:
            stored = None
        source._set_stored(stored)
        self._stored_at = -1 if stored is None else stored
        remembered = source.copy.offset
        if stored is None and remembered is not None and source.handled is None:
            # the broker forgot it: retention removed it (then continue at the first
            # retained, counting the gap), or the stream is a new one (then `offset`)
            if self.probe is None:
                self.probe = LagProbe(self.config, source.consumer)
            head = await self.probe.head()
            if head is not None and head > remembered:
                stored = remembered
        resume = max(
            -1 if stored is None else stored, -1 if source.handled is None else source.handled
        )
        if resume >= 0:
            self._next = self._resumed_at = resume + 1
            return ConsumerOffsetSpecification(OffsetType.OFFSET, resume + 1)
        kind, value = offset_spec(self.config.offset)
        types = {
            "first": OffsetType.FIRST, "last": OffsetType.LAST, "next": OffsetType.NEXT,
            "offset": OffsetType.OFFSET, "timestamp": OffsetType.TIMESTAMP,
        }  # fmt: skip
        if kind == "offset":
            self._next = value or 0
        return ConsumerOffsetSpecification(types[kind], value)

    # Chunks: one batch each, raised together, the offset stored after.
    def _on_chunk(self, frame: Any) -> None:
        source = self.source
        first = frame.chunk_first_offset
        try:
            messages = frame.get_messages()
        except Exception:  # a sub-entry batch it cannot read (an unknown compression)
            messages = [b""] * frame.num_records  # each counted not_amqp10 below
        last = first + len(messages) - 1
        expected = self._next
        if first < expected:  # a chunk starts before the offset asked for
            messages = messages[expected - first :]
        if self._resumed_at >= 0:  # the first chunk since resuming at an offset
            if first > self._resumed_at:  # retention, or only the broker's own
                # offset-tracking records (they take offsets too): the probe tells
                self._gap_task = asyncio.get_running_loop().create_task(
                    self._check_gap(first, self._resumed_at)
                )
            self._resumed_at = -1
        if last < max(expected, 0) or not messages:
            return
        self._next = last + 1
        source.chunks += 1
        relay = self.relay
        stale = 0
        bodies: list[bytes] = []
        bad = dict.fromkeys(AMQP10_REASONS, 0)
        if self._max_age_ms and time.time() * 1000.0 - frame.timestamp > self._max_age_ms:
            stale = len(messages)
        else:
            append = bodies.append
            for message in messages:
                try:
                    append(body(message))
                except NotAmqp10 as exc:
                    bad[exc.reason] += 1
        with relay.lock:
            if bodies:
                relay.forward_batch(bodies)
            relay.reject("stale", stale)
            for reason, n in bad.items():
                relay.reject(reason, n)
        source.handled = last  # queued for the workers (or counted): may be stored
        self._unstored += len(messages)
        if self._unstored >= self.config.store_every_messages:
            self._store_soon()
        elif self._store_task is None:
            self._store_task = asyncio.get_running_loop().create_task(self._store_later())

    async def _store_later(self) -> None:
        await asyncio.sleep(self.config.store_every_ms / 1000.0)
        self._store_task = None
        self._store_soon()

    def _store_soon(self) -> None:
        self._unstored = 0
        handled = self.source.handled
        if handled is None or handled <= self._stored_at or self.consumer is None:
            return
        self._stored_at = handled
        asyncio.get_running_loop().create_task(self._store(handled))

    async def _store(self, offset: int) -> None:
        try:
            await asyncio.wait_for(
                self.consumer.store_offset(self.config.stream, self.source.consumer, offset),
                CONNECT_TIMEOUT,
            )
        except Exception as exc:
            log.debug("stream %s: offset %d not stored: %r", self.source.name, offset, exc)
            return
        self.source._set_stored(offset)

    # The end of a session.
    async def _on_closed(self, info: Any) -> None:
        if not self.lost.is_set() and not self.source._stop.is_set():
            self.source._count_error("connection_lost", f"connection lost: {info.reason}")
        self.lost.set()

    def _on_gone(self, stream: str) -> None:
        if stream != self.config.stream or self.lost.is_set():
            return
        if not self.source._stop.is_set():
            self.source._count_error(
                "stream_deleted", f"stream {stream!r} was deleted (or lost its leader)"
            )
            self.source.handled = None  # a stream declared again starts its offsets anew
        self.lost.set()

    async def _close(self) -> None:
        if self._store_task is not None:
            self._store_task.cancel()
        consumer, self.consumer = self.consumer, None
        handled = self.source.handled
        with contextlib.suppress(Exception):
            if consumer is not None and handled is not None and handled > self._stored_at:
                await asyncio.wait_for(
                    consumer.store_offset(self.config.stream, self.source.consumer, handled),
                    CLOSE_TIMEOUT / 2,
                )
                self.source._set_stored(handled)
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.close(), CLOSE_TIMEOUT / 2)
        if self.probe is not None:
            await self.probe.close()

    async def _check_gap(self, first: int, asked: int) -> None:
        """The first chunk came after the offset asked for: when it is the stream's
        first (retention removed what was asked for), count the offsets missed."""
        if self.probe is None:
            self.probe = LagProbe(self.config, self.source.consumer)
        try:
            head = await self.probe.head()
        except Exception as exc:
            log.debug("stream %s: first offset not read: %r", self.source.name, exc)
            return
        if head is not None and head >= first:
            self.source._add_missed(first - asked)
            log.warning(
                "stream %s: offsets %d to %d were gone (retention) before this engine read them",
                self.source.name,
                asked,
                first - 1,
            )

    # Lag: the stream's last offset minus the engine's.
    async def _read_lag(self) -> None:
        while not self.lost.is_set():
            with contextlib.suppress(Exception):
                if self.probe is None:
                    self.probe = LagProbe(self.config, self.source.consumer)
                tail = await self.probe.tail()
                handled = self.source.handled
                if tail is not None:
                    self.source._set_lag(max(0, tail - (-1 if handled is None else handled)))
            await asyncio.sleep(LAG_INTERVAL)
