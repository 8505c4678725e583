"""A worker process: drain its ring in batches, send, count once per batch.

The loop, per batch:
  1. ask the ring for a batch of up to `batch_max` event records
     (`Ring.read_batch`: a control record ends the batch, and is applied once
     the events before it are sent, so ordering is exact); the ring aims the
     iovec table at the payloads inside it;
  2. mark the batch in flight (`Region.mark_sending`);
  3. for every subscriber of those events, send them with one `sendmmsg` on
     its socket, beating the heart once per subscriber;
  4. commit the counters and the ring's read position together (counters.py).
Every shared-memory layout is engine.shm's: nothing here computes an offset
into the ring or the counter block. Nothing here imports the MI, HTTP or
config code (import-linter checks it).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import signal
import time
from typing import Final

from engine.shm.counters import BATCH_BUCKETS, LATENCY_BUCKETS_NS, TRANSPORTS, CounterBlock
from engine.shm.doorbell import Doorbell
from engine.shm.ring import KIND_STOP, KIND_SUBSCRIBE, KIND_UNSUBSCRIBE, Ring
from engine.shm.segment import Segment
from engine.shm.spec import WorkerSpec
from workers import logs
from workers.routes import RouteSender, RouteTable
from workers.sender import RECONNECT_ERRNOS, BatchSender, reason_index
from workers.table import FD_RESERVE, Subscriber, SubscriberTable, raise_fd_limit

# Idle back-off: spin briefly, then short sleeps while traffic is recent
# (engine.idle_poll_ms), then sleep on the ring's doorbell until the producer
# rings (no CPU at all while idle).
IDLE_SPINS: Final = 200
SHORT_SLEEP_S: Final = 50e-6
# Woken from the doorbell, spin this long for the record: the producer rings ahead
# of its append after a pause (engine/fanout.py, wake_ahead), and a short sleep
# here would cost another wake-up. A wake with no record after it costs this much.
WOKEN_SPIN_NS: Final = 1_000_000
WOKEN: Final = -1  # spin_until's value right after a wake-up: no deadline yet
# Most datagrams one batch may carry: with thousands of subscribers a batch ends
# (and commits the progress the producer's backlog bound reads) every ~0.1 s.
BATCH_MAX_PAIRS: Final = 32_768
# ...but at least this many events, or 50,000 subscribers would cost one system
# call per datagram each (a batch of 8 x 50,000 takes about a second).
BATCH_MIN_EVENTS: Final = 8

# From this many events in a batch, its latency histogram is counted by bisecting
# the sorted raise times per bucket instead of each event's delay (same counts).
VECTOR_OBSERVE_MIN: Final = 16

UNIX: Final = TRANSPORTS.index("unix")
PR_SET_PDEATHSIG: Final = 1
PR_SET_TIMERSLACK: Final = 29


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _prepare_process(spec: WorkerSpec) -> None:
    logs.setup()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the engine
    _prctl(PR_SET_TIMERSLACK, 1000)  # 1 us: short idle sleeps stay short
    # A service manager (systemd, `timeout`, `docker stop`) or a terminal signals the
    # whole process group: the supervisor drains and stops us (a STOP record), and
    # SIGHUP there means "reload", which is the main process's business.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if spec.cpu is not None:
        import psutil

        with contextlib.suppress(psutil.Error, OSError, ValueError):
            psutil.Process().cpu_affinity([spec.cpu])


def main(spec: WorkerSpec) -> None:
    """Process entry point."""
    _prepare_process(spec)
    if spec.parent_pid and os.getppid() != spec.parent_pid:
        return  # the engine died while we were starting
    Worker(spec).run()


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ring_segment = Segment.attach(spec.ring_name)
        self.counter_segment = Segment.attach(spec.counters_name)
        doorbell = Doorbell(spec.doorbell_fd) if spec.doorbell_fd >= 0 else None
        self.ring = Ring(self.ring_segment.buf, doorbell)
        block = CounterBlock(self.counter_segment.buf)
        self.region = block.region(spec.index)
        self.layout = block.layout
        self.values = self.region.counters()
        limit = spec.socket_limit or max(1, raise_fd_limit() - FD_RESERVE)
        self.table = SubscriberTable(limit, spec.sndbuf)
        self.routes = RouteTable(spec.sndbuf)  # groups and filtered sockets (routes.py)
        for event_id, control in spec.snapshot:
            if control.policy:
                self.routes.subscribe(event_id, control)
            else:
                self.table.subscribe(event_id, control)
        self.sender = BatchSender(self.ring.data, spec.batch_max, spec.use_sendmmsg)
        self.touched: set[int] = set()
        self.unix_wait_s = spec.unix_wait_ms / 1000.0
        self.batch_deadline = 0.0
        lay = self.layout
        self.i_records = lay.scalar("records_read")
        self.i_events = lay.scalar("events")
        self.i_controls = lay.scalar("controls")
        self.i_batches = lay.scalar("batches")
        self.i_sent = lay.scalar("pairs_sent")
        self.i_failed = lay.scalar("pairs_failed")
        self.i_subscribers = lay.scalar("subscribers")
        self.i_consumed = lay.scalar("pairs_consumed")
        self.i_stale = lay.scalar("pairs_stale")
        self.i_shared = lay.scalar("shared_subscribers")
        self._set(self.i_subscribers, len(self.table.by_key) + self.routes.sockets)
        self._set(self.i_shared, self.table.shared_count)
        self.route_sender = RouteSender(
            self.routes, self.sender, self.region, self.layout, self._add, self._set,
            spec.batch_max,
            self.unix_wait_s,
        )  # fmt: skip
        self.route_deadline = [0.0]

    def _add(self, index: int, delta: int) -> None:
        self.values[index] += delta
        self.touched.add(index)

    def _set(self, index: int, value: int) -> None:
        self.values[index] = value
        self.touched.add(index)

    def run(self) -> None:
        self.region.mark_ready(os.getpid())
        try:
            self._loop()
        finally:
            self.region.mark_exited()
            self.table.close()
            self.routes.close()

    def _loop(self) -> None:
        ring = self.ring
        read_batch = ring.read_batch
        region = self.region
        beat = region.beat
        batch_max = self.spec.batch_max
        iov = self.sender.iov_words
        base = self.sender.data_address
        parent = self.spec.parent_pid
        poll_ns = int(self.spec.idle_poll_ms * 1e6)
        max_delay_ns = int(self.spec.max_delay_ms * 1e6)
        rpos = ring.read_pos
        idle = 0
        last_busy = time.monotonic_ns()
        spin_until = 0  # after a wake-up: spin (no sleep) until then
        eids: list[int] = []
        lengths: list[int] = []
        stamps: list[int] = []
        stale: list[tuple[int, int]] = []
        while True:
            wpos = ring.write_pos
            if wpos == rpos:
                idle += 1
                if idle < IDLE_SPINS:
                    continue
                now = time.monotonic_ns()
                if now < spin_until:
                    continue
                if spin_until == WOKEN:  # just woken: spin a while for the record
                    spin_until = now + WOKEN_SPIN_NS
                    continue
                beat(now)
                if now - last_busy < poll_ns:  # traffic is recent: poll
                    time.sleep(SHORT_SLEEP_S)
                    continue
                if parent and os.getppid() != parent:
                    return
                # Until the producer rings (no time-out: the engine's death kills us,
                # PR_SET_PDEATHSIG, and the supervisor rings if a wake-up was lost).
                ring.sleep(rpos)
                # Straight back to the ring: after a pause every step is slow (cold
                # caches), so nothing (no clock, no heartbeat) comes before the send.
                spin_until = WOKEN
                continue
            idle = spin_until = 0
            stale_before = time.monotonic_ns() - max_delay_ns if max_delay_ns else 0
            pos, records, consumed, n, control = read_batch(
                rpos, wpos, batch_max, iov, base, eids, lengths, stamps, stale_before, stale,
                BATCH_MAX_PAIRS, BATCH_MIN_EVENTS,
            )  # fmt: skip
            if n:
                region.mark_sending(pos)
                self.batch_deadline = 0.0  # the UNIX wait budget starts at the first wait
                self._send_batch(n, eids, lengths, stamps)
                self._add(self.i_events, n)
                self._add(self.i_batches, 1)
            if stale:
                self._count_stale(stale)
            self._add(self.i_consumed, consumed)
            stop = False
            if control is not None:
                stop = self._apply_control(*control)
            self._add(self.i_records, records)
            region.commit(self.values, self.touched, ring, pos)
            self.touched.clear()
            rpos = pos
            last_busy = time.monotonic_ns()
            beat(last_busy)
            if stop:
                return

    def _count_stale(self, stale: list[tuple[int, int]]) -> None:
        """Events older than engine.max_delay_ms: dropped for all their subscribers."""
        lay = self.layout
        for eid, fanout in stale:
            self._add(lay.stale(eid), fanout)
            self._add(self.i_stale, fanout)
        self._add(self.i_events, len(stale))
        stale.clear()

    def _apply_control(self, kind: int, event_id: int, offset: int, length: int) -> bool:
        self._add(self.i_controls, 1)
        if kind == KIND_STOP:
            return True
        control = self.ring.control_payload(offset, length)
        if control.policy:  # a group or a filtered socket
            if kind == KIND_SUBSCRIBE:
                self.routes.subscribe(event_id, control)
            elif kind == KIND_UNSUBSCRIBE:
                self.routes.unsubscribe(event_id, control.key)
            self._set(self.i_subscribers, len(self.table.by_key) + self.routes.sockets)
            return False
        if kind == KIND_SUBSCRIBE:
            self.table.subscribe(event_id, control)
        elif kind == KIND_UNSUBSCRIBE:
            self.table.unsubscribe(event_id, control.key)
        self._set(self.i_subscribers, len(self.table.by_key) + self.routes.sockets)
        self._set(self.i_shared, self.table.shared_count)
        return False

    def _send_batch(self, n: int, eids: list[int], lengths: list[int], stamps: list[int]) -> None:
        by_event = self.table.by_event
        first = eids[0]
        if eids.count(first) == n:
            subs = by_event.get(first, {})
            total = sum(lengths)
            for sub in subs.values():
                self._send_range(sub, n, first, total, lengths)
            pairs = n * len(subs)
        else:
            pairs = self._send_mixed(n, eids, lengths)
        if self.table.shared_by_event:
            pairs += self._send_shared(n, eids, lengths)
        if self.routes.by_event:  # groups and filters: nothing to pay when there are none
            self.route_deadline[0] = self.batch_deadline
            pairs += self.route_sender.send(n, eids, lengths, self.route_deadline)
            self.batch_deadline = self.route_deadline[0]
        self._observe(pairs, stamps)

    def _send_shared(self, n: int, eids: list[int], lengths: list[int]) -> int:
        """Subscribers on shared sockets: each event to its whole group in one
        sendmmsg (per family), in batch order. Returns the pairs handled."""
        shared = self.table.shared_by_event
        iov = self.sender.iov_words
        lay = self.layout
        region = self.region
        pairs = 0
        for i in range(n):
            groups = shared.get(eids[i])
            if not groups:
                continue
            eid, length = eids[i], lengths[i]
            for group in groups.values():
                region.beat(time.monotonic_ns())
                sent = group.send(iov[2 * i], iov[2 * i + 1])
                members = group.order  # as sent: the errors index it
                transport = members[0].transport
                self._add(lay.sent(eid, transport), sent)
                self._add(lay.sent_bytes(eid, transport), sent * length)
                self._add(self.i_sent, sent)
                failed = {index: err for index, err in group.errors}
                for err in failed.values():
                    self._add(lay.failure(transport, reason_index(err or errno.EIO)), 1)
                if failed:
                    self._add(self.i_failed, len(failed))
                for index, sub in enumerate(members):
                    if sub.slot >= 0:
                        bad = index in failed
                        region.count_subscriber(sub.slot, 0 if bad else 1, 1 if bad else 0)
                pairs += len(members)
        return pairs

    def _send_range(
        self, sub: Subscriber, n: int, eid: int, total: int, lengths: list[int]
    ) -> None:
        """Entries [0, n) all carry `eid`: one sendmmsg call (or a few) on sub's socket."""
        lay = self.layout
        sent = self._deliver(sub, 0, n)
        failed = self.sender.errors
        if failed:
            total -= sum(lengths[i] for i, _ in failed)
        self._add(lay.sent(eid, sub.transport), sent)
        self._add(lay.sent_bytes(eid, sub.transport), total)
        self._add(self.i_sent, sent)

    def _send_mixed(self, n: int, eids: list[int], lengths: list[int]) -> int:
        """Several event ids in one batch: each subscriber gets its own events, in order.

        A subscriber that wants only some of them gets a compact copy of those
        iovec entries in the table's second half. Returns the pairs handled.
        """
        by_event = self.table.by_event
        wanted: dict[int, Subscriber] = {}
        for eid in set(eids):
            for sub in by_event.get(eid, {}).values():
                wanted[id(sub)] = sub
        lay = self.layout
        sender = self.sender
        iov = sender.iov_words
        spare = self.spec.batch_max
        pairs = 0
        for sub in wanted.values():
            mine = [i for i in range(n) if eids[i] in sub.events]
            if len(mine) == n:
                start = 0
            else:
                start = spare
                for j, i in enumerate(mine):
                    iov[2 * (spare + j)] = iov[2 * i]
                    iov[2 * (spare + j) + 1] = iov[2 * i + 1]
            sent = self._deliver(sub, start, len(mine))
            failed = {entry - start for entry, _ in sender.errors}
            for j, i in enumerate(mine):
                if j not in failed:
                    self._add(lay.sent(eids[i], sub.transport), 1)
                    self._add(lay.sent_bytes(eids[i], sub.transport), lengths[i])
            self._add(self.i_sent, sent)
            pairs += len(mine)
        return pairs

    def _deliver(self, sub: Subscriber, start: int, count: int) -> int:
        """Send entries [start, start+count) to one subscriber; count failures by reason."""
        sender = self.sender
        # Own connected socket (subscribers on shared sockets go by _send_shared).
        if not sub.connected:
            now = time.monotonic()
            if now < sub.retry_at or not self.table.connect(sub, now):
                self.region.beat(time.monotonic_ns())
                sender.errors[:] = [(i, sub.last_errno) for i in range(start, start + count)]
                self._count_failures(sub, count)
                if sub.slot >= 0:
                    self.region.count_subscriber(sub.slot, 0, count)
                return 0
        # A UNIX receiver's queue is short (net.unix.max_dgram_qlen): wait for it to
        # drain, within the batch's budget -- unless it made no progress last time.
        wait = sub.transport == UNIX and not sub.stalled and self.unix_wait_s > 0
        if wait and not self.batch_deadline:
            self.batch_deadline = time.monotonic() + self.unix_wait_s
        sent = sender.send(sub.sock, start, count, self.batch_deadline if wait else 0.0)
        # A batch to thousands of subscribers takes a while: beat per subscriber, so
        # the supervisor tells a busy worker from a stuck one (after the send: the
        # first datagram after a pause goes out sooner).
        self.region.beat(time.monotonic_ns())
        if sub.transport == UNIX:
            if sender.errors and wait and not sender.sent_after_wait:
                sub.stalled = True  # waited in vain: do not hold up the batch for it again
            elif sent:
                sub.stalled = False  # it reads again: it may be waited for
        if sub.slot >= 0:
            self.region.count_subscriber(sub.slot, sent, len(sender.errors))
        if sender.errors:
            self._count_failures(sub, len(sender.errors))
            last = sender.errors[-1][1]
            if sub.transport == UNIX and last in RECONNECT_ERRNOS:
                sub.connected = False  # peer gone: connect again before the next send
                sub.last_errno = last
                sub.retry_at = 0.0
        return sent

    def _count_failures(self, sub: Subscriber, count: int) -> None:
        lay = self.layout
        for _i, err in self.sender.errors:
            self._add(lay.failure(sub.transport, reason_index(err or errno.EIO)), 1)
        self._add(self.i_failed, count)

    def _observe(self, pairs: int, stamps: list[int]) -> None:
        """Batch-size (datagrams) and raise-to-send latency histograms, once per batch."""
        lay = self.layout
        self._add(lay.batch_base + bisect.bisect_left(BATCH_BUCKETS, pairs), 1)
        self._add(lay.batch_base + len(BATCH_BUCKETS) + 1, pairs)
        now = time.monotonic_ns()
        lat_base = lay.latency_base
        n = len(stamps)
        if n >= VECTOR_OBSERVE_MIN and max(stamps) <= now:
            self._observe_many(now, sorted(stamps))
            return
        total = 0
        for ts in stamps:
            delta = max(now - ts, 0)
            total += delta
            self._add(lat_base + bisect.bisect_left(LATENCY_BUCKETS_NS, delta), 1)
        self._add(lat_base + len(LATENCY_BUCKETS_NS) + 1, total)

    def _observe_many(self, now: int, ascending: list[int]) -> None:
        lat_base = self.layout.latency_base
        for index, count in enumerate(latency_counts(now, ascending)):
            if count:
                self._add(lat_base + index, count)
        self._add(lat_base + len(LATENCY_BUCKETS_NS) + 1, len(ascending) * now - sum(ascending))


def latency_counts(now: int, ascending: list[int]) -> list[int]:
    """Per latency bucket (the last is +Inf), how many of the events raised at
    `ascending` (sorted, none after `now`) waited until `now`: at C speed, since a
    delay is at most bucket b exactly when its raise time is at least now - b, so each
    bucket's count is a difference of two bisections (the same counts as bisecting
    each event's delay, which cost a worker ~2% of its CPU at full rate)."""
    n = len(ascending)
    counts = [0] * (len(LATENCY_BUCKETS_NS) + 1)
    below = 0  # events whose delay is at most the previous bucket's bound
    for index, bound in enumerate(LATENCY_BUCKETS_NS):
        within = n - bisect.bisect_left(ascending, now - bound)
        counts[index] = within - below
        below = within
    counts[-1] = n - below
    return counts
