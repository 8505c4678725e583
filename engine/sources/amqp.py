"""A broker source: consume JSON-RPC notifications from RabbitMQ (SPEC section 9).

Why this is long: a source and its session are one chain of pika callbacks
(connect, declare, bind, consume, ack); split, the chain is read across files
(its settings are amqp_config.py, its fast path amqp_frames.py).

OpenSIPS's event_rabbitmq publishes each event to an exchange with the same
notification body event_datagram sends. Each engine binds a queue of its own to
that exchange (`[[amqp]]`), so every engine sees every event and fans it out to
the subscribers that subscribed at that engine.

One thread per `[[amqp]]` runs a pika SelectConnection (pika: the fastest of the
clients measured here; docs/design.md, "The broker client"). Per connection:

- declare the exchange when `declare = true` (else it must exist: a missing one
  is an error counted "exchange_missing", retried with back-off);
- declare the queue: `queue = ""` is a server-named, exclusive queue (gone when
  the connection is), else a durable queue of that name; bind it with each of
  `binding_keys`;
- with `max_age_ms`, the queue gets `x-message-ttl = max_age_ms`, so the broker
  itself never hands over a message that waited longer, dead-lettered into a
  second queue of ours (exclusive, or for a named queue the durable
  `NAME.stale`) that is read only to count them `stale`;
  a message that carries its publish time (header `timestamp_in_ms`, else the
  AMQP `timestamp` property, in whole seconds) and is older is counted `stale`
  on arrival too. Nothing stale is delivered late;
- `basic.qos(prefetch)`, then consume: the messages of one read of the socket
  go through the Relay together (Relay.forward_batch: validated and raised byte
  for byte, counted by reason, exactly like ingest datagrams) and are then
  acknowledged in batches (`multiple`): every ACK_EVERY messages, and ACK_FLUSH
  seconds after the last one at most;
- every LAG_INTERVAL a passive declare reads the messages still waiting (lag).

The fast path for deliveries (amqp_frames.py): while a session consumes, whole
deliveries are read straight from the bytes pika has read (about 3 us a message
instead of pika's 35), and every other frame is left to pika; `fast_path` says
why when this pika's internals are not the expected ones (plain pika then).

A message larger than `max_message_bytes` (its content header says how large)
is skipped as it arrives, never buffered, counted `oversize` and acknowledged
with the rest (docs/broker-hardening.md).

A lost connection is made again after a back-off (BACKOFF_FIRST doubling to
BACKOFF_MAX); the thread never holds up start-up, stop or any other source, and
never ends before stop(): whatever a session raises is counted ("internal") and
the source retried; were the thread to die all the same, statistics() starts it
again ("thread_restarted"). A failure is logged at once, then once per change
of state (not once per retry). A URL pika would refuse is a config error.
Per source: received = rejected (by reason) + raised, as for the ingest. A
consumer the broker cancels (its queue deleted) is an error ("queue_refused"):
the session acknowledges what it raised and the source reconnects.

Acknowledged after the raise: an event is queued for the workers (or counted
dropped) before the broker forgets it. A crash between the raise and the ack
means the broker delivers it again to a durable queue (possibly sent twice),
and that an exclusive queue is gone with it (unacknowledged messages lost).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from engine.sources.amqp_config import AmqpConfig as AmqpConfig
from engine.sources.amqp_frames import (
    DeliveryReader,
    connection_type,
    too_old,
)
from engine.sources.relay import SOURCE_REJECT_REASONS, Relay
from engine.statistics import SourceStatistics

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.amqp")

# An ingest's reasons but the source address check, and messages too old.
AMQP_REJECT_REASONS: Final = (
    *(r for r in SOURCE_REJECT_REASONS if r != "source_not_allowed"),
    "stale",
)
ERROR_REASONS: Final = (
    "connect_failed",  # no connection (broker down, refused, bad credentials)
    "connection_lost",  # a connection that was up went away
    "exchange_missing",  # declare = false and the exchange does not exist
    "queue_refused",  # the queue could not be declared, bound or consumed, or the
    # broker cancelled our consumer (the queue was deleted while we consumed)
    "access_refused",  # the broker refused the credentials (or the vhost)
    "internal",  # anything else that went wrong in the source's thread (caught)
    "thread_restarted",  # the thread had died all the same, and was started again
)
ACK_EVERY: Final = 200  # messages per multiple-ack (at most prefetch / 2)
ACK_FLUSH: Final = 0.05  # seconds: a partial ack batch waits no longer
LAG_INTERVAL: Final = 2.0  # seconds between reads of the queue's waiting messages
BACKOFF_FIRST: Final = 0.25  # seconds before the first reconnect
BACKOFF_MAX: Final = 5.0
CONNECT_TIMEOUT: Final = 3.0  # seconds for one connection attempt
STOP_BUDGET: Final = 2.0  # seconds stop() waits for the connection to close
HEARTBEAT: Final = 10  # seconds: a silent broker is noticed within two of these


class AmqpSource:
    """One `[[amqp]]`: a queue on a RabbitMQ exchange, read into an Engine."""

    def __init__(self, engine: Engine, config: AmqpConfig) -> None:
        problem = config.problem()
        if problem:
            raise ValueError(f"amqp {problem[0]}: {problem[1]}")
        self.config = config
        self._url = config.url_value()  # read once: a file or variable changed later is not
        self.name = config.display_name()
        pika_log = logging.getLogger("pika")
        if pika_log.level == logging.NOTSET:  # it logs every connection and every failed
            pika_log.setLevel(logging.CRITICAL)  # attempt; this module logs what matters
        self.relay = Relay(
            engine, "amqp", self.name, config.unknown_events, reasons=AMQP_REJECT_REASONS
        )
        self._max_age_s = config.max_age_ms / 1000.0
        self._ack_every = max(1, min(ACK_EVERY, config.prefetch // 2))
        self._lock = threading.Lock()  # the fields below, read by statistics()
        self._up = False
        self._reconnects = 0
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._lag: int | None = None
        self.queue_name = ""  # the queue bound, once known (server-named: amq.gen-...)
        self._stop = threading.Event()
        self._connected_once = False
        self._logged = ""  # the state last logged ("up" or an error reason): one line a change
        self._session: _Session | None = None  # the connection's, owned by the thread
        self.fast_deliveries = 0  # messages taken by the fast path (the thread's; for tests)
        self.fast_path = ""  # "" or why pika parses every delivery (once a session began)
        self._thread = threading.Thread(target=self._run, name="edg-amqp", daemon=True)

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        """Start the thread; never waits for the broker."""
        self._thread.start()

    def stop(self) -> None:
        """Acknowledge what was raised, close the connection (STOP_BUDGET at most)."""
        self._stop.set()
        session = self._session
        if session is not None:
            with contextlib.suppress(Exception):  # its loop has ended meanwhile
                session.connection.ioloop.add_callback_threadsafe(session.close)
        if self._thread.ident is not None:
            self._thread.join(STOP_BUDGET)
            if self._thread.is_alive():
                log.warning("amqp %s: connection still closing; not waited for", self.name)

    def statistics(self) -> list[SourceStatistics]:
        self._check_thread()
        with self._lock:
            extra = {
                "up": 1 if self._up else 0,
                "errors": dict(self._errors),
                "reconnects": self._reconnects,
                "lag": self._lag,
            }
        return [self.relay.statistics(**extra)]

    # -- the thread --------------------------------------------------------------------------

    def _check_thread(self) -> None:
        """Start the thread again if it died all the same (every exception of a
        session is caught in _run: this is the last resort), counted."""
        thread = self._thread
        if self._stop.is_set() or thread.ident is None or thread.is_alive():
            return
        with self._lock:
            if self._thread is not thread:  # another reader restarted it
                return
            self._thread = threading.Thread(target=self._run, name="edg-amqp", daemon=True)
            self._errors["thread_restarted"] += 1
            self._up = False
        log.error("amqp %s: the source's thread had stopped; started again", self.name)
        self._thread.start()

    def _run(self) -> None:
        """The thread: one session after another until stop(). Nothing a broker sends
        or a session does ends it: an exception is counted ("internal"), logged once
        per change of state, and the source retried with back-off."""
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            consumed = False
            try:
                consumed = self._one_session()
            except Exception as exc:
                self._count_error("internal", f"the source failed: {exc!r}", exc)
            finally:
                self._session = None
                self._set_up(False)
            if self._stop.is_set():
                break
            delay = BACKOFF_FIRST if consumed else min(delay * 2, BACKOFF_MAX)
            self._stop.wait(delay * random.uniform(0.8, 1.2))

    def _one_session(self) -> bool:
        """Connect, consume until the connection ends: whether it got to consume."""
        import pika  # the optional extra: imported by the thread, not at start-up

        params = pika.URLParameters(self._url)
        params.connection_attempts = 1
        params.socket_timeout = CONNECT_TIMEOUT
        params.stack_timeout = CONNECT_TIMEOUT
        params.heartbeat = HEARTBEAT
        session = _Session(self._session_settings(), params)
        self._session = session
        if self._stop.is_set():  # stop() came before the session was there to close
            return False
        try:
            session.connection.ioloop.start()  # returns when the connection ends
        except Exception:
            session.abandon()  # close what the failed loop left open
            raise
        return session.consumed

    # -- helpers for the session -------------------------------------------------------------

    def _session_settings(self) -> _SessionSettings:
        return _SessionSettings(
            config=self.config,
            relay=self.relay,
            max_age_s=self._max_age_s,
            ack_every=self._ack_every,
            stopping=self._stop.is_set,
            count_error=self._count_error,
            connected=self._connected,
            set_lag=self._set_lag,
            set_fast_path=self._set_fast_path,
            count_fast=self._count_fast,
        )

    def _set_fast_path(self, why: str) -> None:
        self.fast_path = why

    def _count_fast(self, n: int) -> None:
        self.fast_deliveries += n

    def _set_up(self, up: bool) -> None:
        with self._lock:
            self._up = up

    def _count_error(self, reason: str, message: str, exc: BaseException | None = None) -> None:
        """Count an error by reason; log it when the state changes (the first failure
        at once, then one line per change, not one per retry)."""
        with self._lock:
            self._errors[reason] += 1
            self._up = False
            changed = self._logged != reason
            self._logged = reason
        if changed:
            log.warning(
                "amqp %s: %s (%s; retried with back-off, logged again when that changes)",
                self.name, message, reason,
                exc_info=exc if reason == "internal" else None,
            )  # fmt: skip

    def _connected(self, queue: str) -> None:
        with self._lock:
            if self._connected_once:
                self._reconnects += 1
            self._connected_once = True
            self._up = True
            self._logged = "up"
            self.queue_name = queue
        log.info("amqp %s: consuming from queue %s", self.name, queue)

    def _set_lag(self, lag: int) -> None:
        with self._lock:
            self._lag = lag


@dataclass(frozen=True, slots=True)
class _SessionSettings:
    """What a session is given by its source: settings, and callbacks to report to
    it (the source's fields stay the source's)."""

    config: AmqpConfig
    relay: Relay
    max_age_s: float  # 0: no age limit
    ack_every: int  # acknowledge after this many messages raised
    stopping: Callable[[], bool]  # stop() was called
    count_error: Callable[[str, str], None]  # (reason, message): counted, logged on change
    connected: Callable[[str], None]  # consuming from this queue
    set_lag: Callable[[int], None]  # messages ready in the queue
    set_fast_path: Callable[[str], None]  # "" or why pika parses every delivery
    count_fast: Callable[[int], None]  # messages the fast path took


class _Session:
    """One connection's life: declare, bind, consume, ack; ends with the connection."""

    def __init__(self, settings: _SessionSettings, params: Any) -> None:
        self.settings = settings
        self.config = settings.config
        self.relay = settings.relay
        self.consumed = False  # got as far as consuming
        self.failed = False  # an error of ours closed it (counted once, by its reason)
        self.channel: Any = None
        self.queue = ""
        self._consumer_tag = b""
        self._bodies: list[bytes] = []  # the batch being gathered
        self._stale = 0  # of the batch: too old by their own timestamp (acked)
        self._oversize = 0  # ... larger than max_message_bytes (acked, never gathered)
        self._malformed = 0  # ... properties that could not be read (acked)
        self._reader: DeliveryReader | None = None  # the fast path's, while consuming
        self._expired = 0  # of the batch: expired in the queue (auto-acked)
        self._batch_due = False
        self._batch_tag = 0  # delivery tag of the batch's newest message
        self._raised_tag = 0  # ... of the newest message raised (what an ack may cover)
        self._unacked = 0
        self._flush_timer: Any = None
        connection_class, self.fast_path = connection_type()
        settings.set_fast_path(self.fast_path)
        self.connection = connection_class(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )

    # Connection and channel
    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, connection: Any, error: Exception) -> None:
        import pika.exceptions

        refused = (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.AuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
        )
        reason = "access_refused" if isinstance(error, refused) else "connect_failed"
        self.settings.count_error(reason, f"cannot connect: {error!r}")
        connection.ioloop.stop()

    def abandon(self) -> None:
        """After the connection's loop failed (an exception out of a callback): close
        the connection (a bounded wait), so no socket and no exclusive queue stay."""
        connection = self.connection
        connection.take = None
        with contextlib.suppress(Exception):
            if connection.is_open:
                connection.close()
            if not connection.is_closed:
                connection.ioloop.call_later(STOP_BUDGET, connection.ioloop.stop)
                connection.ioloop.start()
        with contextlib.suppress(Exception):
            connection.ioloop.close()

    def close(self) -> None:
        """In the connection's thread: acknowledge what was raised, then close."""
        if self._batch_due:
            self._raise_batch()
        if self._unacked:
            self._ack()
        if self.connection.is_open:
            self.connection.close()
        elif not self.connection.is_closing:
            self.connection.ioloop.stop()  # still connecting: give up on it

    def _on_closed(self, connection: Any, reason: Exception) -> None:
        self.connection.take = None
        if self._batch_due:  # received: raised and counted (a durable queue will
            self._raise_batch()  # deliver them again, unacknowledged: see the top)
        if self.consumed and not self.failed and not self.settings.stopping():
            self.settings.count_error("connection_lost", f"connection lost: {reason!r}")
        connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        cfg = self.config
        if cfg.declare:
            channel.exchange_declare(
                cfg.exchange, cfg.exchange_type, durable=True, callback=self._on_exchange
            )
        else:
            channel.exchange_declare(cfg.exchange, passive=True, callback=self._on_exchange)

    def _on_channel_closed(self, channel: Any, reason: Any) -> None:
        import pika.exceptions

        self.connection.take = None
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return  # the connection went (counted there), or we closed it
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", str(reason))
        if not self.settings.stopping() and not self.failed:
            self.failed = True
            if code == 404 and not self.queue:
                self.settings.count_error(
                    "exchange_missing", f"exchange {self.config.exchange!r} does not exist: {text}"
                )
            else:
                self.settings.count_error("queue_refused", f"channel closed ({code}): {text}")
        if self.connection.is_open:
            self.connection.close()

    # Declare and bind
    def _on_exchange(self, _frame: Any) -> None:
        cfg = self.config
        if cfg.max_age_ms:  # first the queue stale messages are dead-lettered into: a
            # named queue's is durable too, so what expires while we are away is counted
            named = bool(cfg.queue)
            self.channel.queue_declare(
                f"{cfg.queue}.stale" if named else "",
                durable=named,
                exclusive=not named,
                callback=self._on_stale_queue,
            )
        else:
            self._declare_queue({})

    def _on_stale_queue(self, frame: Any) -> None:
        stale = frame.method.queue
        self.channel.basic_consume(stale, self._on_stale, auto_ack=True)
        self._declare_queue(
            {
                "x-message-ttl": self.config.max_age_ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": stale,
            }
        )

    def _declare_queue(self, arguments: dict[str, Any]) -> None:
        cfg = self.config
        named = bool(cfg.queue)
        self.channel.queue_declare(
            cfg.queue,
            durable=named,
            exclusive=not named,
            arguments=arguments or None,
            callback=self._on_queue,
        )

    def _on_queue(self, frame: Any) -> None:
        self.queue = frame.method.queue
        self._bind(list(self.config.binding_keys))

    def _bind(self, keys: list[str]) -> None:
        if not keys:
            self.channel.basic_qos(prefetch_count=self.config.prefetch, callback=self._on_qos)
            return
        key = keys.pop(0)
        self.channel.queue_bind(
            self.queue, self.config.exchange, routing_key=key, callback=lambda _f: self._bind(keys)
        )

    def _on_cancelled(self, _frame: Any) -> None:
        """The broker cancelled a consumer of ours (its queue was deleted, say): raise
        and acknowledge what came, then reconnect (declaring the queue again)."""
        self.connection.take = None
        if self.settings.stopping() or self.failed:
            return
        self.failed = True
        self.settings.count_error(
            "queue_refused", f"the broker cancelled the consumer of queue {self.queue}"
        )
        self.close()

    def _on_qos(self, _frame: Any) -> None:
        tag = self.channel.basic_consume(self.queue, self._on_message, auto_ack=False)
        if not self.fast_path:  # deliveries to `tag`: read by the reader, not pika
            self._consumer_tag = tag.encode()
            self._reader = DeliveryReader(
                self.channel.channel_number,
                self._consumer_tag,
                self._bodies,
                max_age_s=self.settings.max_age_s,
                max_bytes=self.config.max_message_bytes,
                on_message=self._batch_later,
            )
            self.connection.take = self._reader
        self.consumed = True
        self.settings.connected(self.queue)
        self.connection.ioloop.call_later(LAG_INTERVAL, self._read_lag)

    # Messages: gathered while pika parses one read, raised together right after it
    # (one Relay.forward_batch), acknowledged once raised.
    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """A delivery pika parsed (plain pika: its internals not the expected ones).
        pika has gathered the whole body, whatever its size: the limit only keeps
        it from the relay here."""
        if len(body) > self.config.max_message_bytes:
            self._oversize += 1
        elif self.settings.max_age_s and too_old(properties, self.settings.max_age_s):
            self._stale += 1
        else:
            self._bodies.append(body)
        self._batch_tag = method.delivery_tag
        self._batch_later()

    def _batch_later(self) -> None:
        """Raise the batch right after this read (a message came)."""
        if not self._batch_due:
            self._batch_due = True
            self.connection.ioloop.call_later(0, self._raise_batch)

    def _on_stale(self, _channel: Any, _method: Any, _properties: Any, _body: bytes) -> None:
        self._expired += 1  # dead-lettered by the queue's x-message-ttl
        if not self._batch_due:
            self._batch_due = True
            self.connection.ioloop.call_later(0, self._raise_batch)

    def _raise_batch(self) -> None:
        self._batch_due = False
        bodies, self._bodies = self._bodies, []
        reader = self._reader
        if reader is not None:
            reader.bodies = self._bodies
            if reader.messages:  # what the fast path read since the last batch
                self._batch_tag = reader.tag
                self._stale += reader.stale
                self._oversize += reader.oversize
                self._malformed += reader.malformed
                self.settings.count_fast(reader.messages)
                reader.messages = reader.stale = reader.oversize = reader.malformed = 0
        stale = self._stale + self._expired
        dropped = self._oversize + self._malformed
        relay = self.relay
        with relay.lock:
            if bodies:
                relay.forward_batch(bodies)
            relay.reject("stale", stale)
            relay.reject("oversize", self._oversize)
            relay.reject("malformed", self._malformed)
        # acknowledged: all but the dead-lettered (auto-acked)
        self._unacked += len(bodies) + self._stale + dropped
        self._stale = self._expired = self._oversize = self._malformed = 0
        self._raised_tag = self._batch_tag
        if self._unacked >= self.settings.ack_every:
            self._ack()
        elif self._unacked and self._flush_timer is None:
            self._flush_timer = self.connection.ioloop.call_later(ACK_FLUSH, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        if self._unacked:
            self._ack()

    def _ack(self) -> None:
        if self.channel is not None and self.channel.is_open and self._raised_tag:
            self.channel.basic_ack(self._raised_tag, multiple=True)
        self._unacked = 0

    def _read_lag(self) -> None:
        if self.channel is None or not self.channel.is_open:
            return
        self.channel.queue_declare(self.queue, passive=True, callback=self._on_lag)
        self.connection.ioloop.call_later(LAG_INTERVAL, self._read_lag)

    def _on_lag(self, frame: Any) -> None:
        self.settings.set_lag(int(frame.method.message_count))
