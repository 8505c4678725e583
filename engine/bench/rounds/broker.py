"""The broker contenders: `--source amqp` (a classic queue read by an `[[amqp]]`
source) and `--source stream` (a RabbitMQ stream read by a `[[stream]]` source).

Both have one shape: a fresh engine with the receivers of the API round; a queue
(or stream) of the round's own bound to the exchange `edg-bench`, filled
beforehand with the round's E_BENCH notifications (`--amqp-messages`, published
with pika; the warm-up, not timed); then the source started on it: the window
runs from the source's start until the workers have sent everything. Reported,
besides every contender's keys: messages consumed per second, CPU µs per message
by role (producer = this process: the source's thread, the client library and the
raise path; broker = the RabbitMQ processes when the bench started them), the
fill's publish rate and the source's counters, in a block named after the kind."""

from __future__ import annotations

import os
import time
from typing import Any, Final

from engine.bench.amqp import EXCHANGE, BenchBrokerError, BrokerFeed
from engine.bench.common import EVENT, SEQ_BASE, bench_params
from engine.bench.live import per
from engine.bench.receivers import RoundReport
from engine.bench.rounds.skeleton import BenchHost, EngineRound, Window
from engine.bench.stream import declare_and_fill, stream_url
from engine.sources.amqp import AmqpConfig, AmqpSource
from engine.sources.stream import StreamSource
from engine.sources.stream_config import StreamConfig
from engine.wire import encode_notification

CONSUME_CAP_S: Final = 300.0  # a round gives up when its queue is not read out by then
STALL_S: Final = 15.0  # ... or when nothing more was consumed for this long


class BrokerRound(EngineRound):
    """What the amqp and stream rounds share; `queue_name`, `fill` and `source` differ."""

    kind = "amqp"  # the source's kind, and the name of the round's own block

    def __init__(self, bench: BenchHost, number: int, feed: BrokerFeed) -> None:
        super().__init__(bench, number)
        self.broker = feed
        self.queue = self.queue_name()
        self.count = int(self.args.amqp_messages)
        self.source: AmqpSource | StreamSource | None = None
        self.published_per_s = 0.0

    def queue_name(self) -> str:
        raise NotImplementedError

    def fill(self, bodies: list[bytes]) -> float:
        raise NotImplementedError

    def make_source(self) -> AmqpSource | StreamSource:
        raise NotImplementedError

    def set_up(self) -> None:
        super().set_up()
        self.pids["broker"] = self.broker.broker_pids()

    def warm_up(self) -> None:
        self.bench.progress.phase = f"{self.phase}: publishing {self.count:,} messages"
        tag = self.tag
        bodies = [
            encode_notification(EVENT, bench_params(tag, SEQ_BASE + i, time.monotonic_ns()))
            for i in range(self.count)
        ]
        self.published_per_s = self.fill(bodies)

    def feed_source(self) -> None:
        """Start the source on the filled queue."""
        self.source = self.make_source()
        self.engine.add_source(self.source)
        self.source.start()

    def feed(self) -> tuple[int, int, int]:
        self.bench.progress.phase = f"{self.phase}: consuming"
        t_start = time.monotonic_ns()
        self.feed_source()
        t_consumed = self._wait_consumed()
        assert self.source is not None
        return self.source.statistics()[0].raised, t_start, t_consumed

    def _wait_consumed(self) -> int:
        """Wait until the source has read every message (bounded); return that time."""
        source = self.source
        assert source is not None
        start = last_change = time.monotonic()
        last = -1
        while True:
            stats = source.statistics()[0]
            now = time.monotonic()
            if stats.received >= self.count:
                return time.monotonic_ns()
            if stats.received != last:
                last, last_change = stats.received, now
            if now - last_change > STALL_S or now - start > CONSUME_CAP_S:
                raise BenchBrokerError(
                    f"the {self.kind} source read {stats.received:,} of {self.count:,} "
                    f"messages (up={stats.up}, errors {stats.errors})"
                )
            time.sleep(0.002)

    def stop_source(self) -> None:
        try:
            if self.source is not None:
                self.source.stop()
        finally:
            self.broker.delete(self.queue)

    def finish(self, result: dict[str, Any], window: Window, report: RoundReport) -> None:
        stats = self.stats
        assert stats is not None
        counts = next(s for s in stats.sources if s.kind == self.kind)
        super().finish(result, window, report)
        cpu = result["cpu_s"]
        consume_s = (window.t_raised - window.t0) / 1e9
        result[self.kind] = {
            ("queue" if self.kind == "amqp" else "stream"): self.queue,
            "messages_published": self.count,
            "messages_published_per_s": self.published_per_s,
            "messages_consumed": counts.received,
            "messages_consumed_per_s": per(counts.received, consume_s),
            "events_raised": counts.raised,
            "rejected": {k: v for k, v in counts.rejected.items() if v},
            "cpu_us_per_message": {role: per(1e6 * v, counts.received) for role, v in cpu.items()},
        }


class AmqpRound(BrokerRound):
    contender = kind = "amqp"
    letter = "a"

    def queue_name(self) -> str:
        return f"edg-bench-{os.getpid()}-{self.number}"

    def fill(self, bodies: list[bytes]) -> float:
        return self.broker.fill(self.queue, bodies)

    def make_source(self) -> AmqpSource:
        config = AmqpConfig(url=self.broker.url, exchange=EXCHANGE, queue=self.queue, prefetch=2000)
        return AmqpSource(self.engine, config)


class StreamRound(BrokerRound):
    contender = kind = "stream"
    letter = "s"

    def queue_name(self) -> str:
        return f"edg-bench-stream-{os.getpid()}-{self.number}"

    def fill(self, bodies: list[bytes]) -> float:
        return declare_and_fill(self.broker, self.queue, bodies)

    def make_source(self) -> StreamSource:
        config = StreamConfig(
            url=stream_url(self.broker, getattr(self.args, "stream_url", "")),
            stream=self.queue,
            consumer=f"bench-{self.number}",
            offset="first",
        )
        return StreamSource(self.engine, config, instance=self.instance)
