"""The counter block: per-worker counters in shared memory, written once per batch.

Layout, version 5 (u64 words, native little-endian):

    Block header, 64 bytes
      0   u64  magic          COUNTERS_MAGIC ("EDGCNTR" + 0x01)
      8   u32  version        COUNTERS_VERSION;  12 u32 header size (64)
      16  u64  workers        number of regions
      24  u64  region words   u64 words per region
      32  u64  max events     event-id slots per region
      40  u64  owner pid      the engine's main process
      48  ..63 reserved
    Region k, at byte 64 + k * region words * 8, as u64 words
      0   pid                 the worker process now serving this region
      1   state               STATE_BOOTING, STATE_READY, STATE_EXITED
      2   sending upto        ring position of the batch being sent (in-flight marker)
      3   journal upto        ring position the journal commits to; 0 = no journal
      4   journal length      entries in the journal
      5   heartbeat           time.monotonic_ns() the worker last showed progress (each
                              idle poll, each batch, each subscriber of a batch); the
                              supervisor restarts a worker that stops beating while its
                              ring holds records
      6   generation          1 + restarts of this region's worker
      7   reserved
      8   journal             JOURNAL_MAX (counter index, new absolute value) pairs
      8 + 2*JOURNAL_MAX       counters, indexed by `CounterLayout` (below); version 5
                              added the scalars pairs_filtered and failovers, and after
                              the latency histogram: filtered pairs per event id, then
                              GROUP_SLOTS (failovers, members down) pairs (routing)
      then                    SUBSCRIBER_SLOTS (datagrams sent, sends failed) pairs, one
                              per subscriber slot the producer assigned (per-subscriber
                              metrics). Written directly, outside the journal: a worker
                              killed mid-batch may leave these off by that batch. A slot
                              freed by a subscriber leaving is zeroed by the producer and
                              given again once the worker has read past its removal.

Why a journal. A batch's counters and its read position must move together,
even if the worker is killed between two stores: the worker writes the new
absolute values into the journal, commits it with one store (journal upto),
applies it, stores the ring's read position, then clears the journal. A
restarted region replays a committed journal (idempotent: absolute values) and
resumes after it, so counters never go backwards or count a batch twice. A
batch that was being sent but not committed is sent again (counted once) and
its pairs are added to `redelivered_pairs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from engine.shm.ring import Ring

COUNTERS_MAGIC: Final = int.from_bytes(b"EDGCNTR\x01", "little")
COUNTERS_VERSION: Final = 5
BLOCK_HEADER_WORDS: Final = 8
REGION_HEADER_WORDS: Final = 8
JOURNAL_MAX: Final = 4096
SUBSCRIBER_SLOTS: Final = 16384  # per worker, reused; subscribers beyond: in the aggregates only
GROUP_SLOTS: Final = 256  # per worker: virtual groups with failover/down counters of their own

STATE_BOOTING: Final = 0
STATE_READY: Final = 1
STATE_EXITED: Final = 2

# Region header word indexes (private: use Region's methods).
_PID, _STATE, _SENDING_UPTO, _JOURNAL_UPTO, _JOURNAL_LEN, _HEARTBEAT, _GENERATION = range(7)

TRANSPORTS: Final = ("udp", "unix")
REASONS: Final = ("eagain", "enobufs", "econnrefused", "enoent", "emsgsize", "other")
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LATENCY_BUCKETS_S: Final = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
)  # fmt: skip
LATENCY_BUCKETS_NS: Final = tuple(int(b * 1e9) for b in LATENCY_BUCKETS_S)

SCALARS: Final = (
    "records_read",  # ring records consumed (events + control)
    "events",  # event records consumed
    "controls",  # control records applied
    "batches",  # send rounds
    "pairs_sent",  # (event, subscriber) pairs handed to the kernel
    "pairs_failed",  # pairs whose send failed (any reason)
    "redelivered_pairs",  # pairs sent again after a worker died mid-batch
    "subscribers",  # sockets this worker holds now (a gauge)
    "pairs_consumed",  # fan-out of the event records consumed (= sent + failed + stale)
    "pairs_stale",  # pairs not sent: the event was older than engine.max_delay_ms
    "shared_subscribers",  # of `subscribers`, those on a shared unconnected socket (a gauge)
    "pairs_filtered",  # pairs not sent: the subscription's filter did not match the event
    "failovers",  # datagrams a group member failed that went to another member instead
)


@dataclass(frozen=True, slots=True)
class CounterLayout:
    """Indexes of each counter inside a region's counter area."""

    max_events: int

    @property
    def scalar_base(self) -> int:
        return 0

    def scalar(self, name: str) -> int:
        return SCALARS.index(name)

    @property
    def sent_base(self) -> int:
        return len(SCALARS)

    def sent(self, event_id: int, transport: int) -> int:
        """Datagrams sent of `event_id` over transport index `transport`."""
        return self.sent_base + event_id * len(TRANSPORTS) + transport

    def sent_bytes(self, event_id: int, transport: int) -> int:
        return self.sent(event_id, transport) + self.max_events * len(TRANSPORTS)

    @property
    def failures_base(self) -> int:
        return self.sent_base + 2 * self.max_events * len(TRANSPORTS)

    def failure(self, transport: int, reason: int) -> int:
        return self.failures_base + transport * len(REASONS) + reason

    @property
    def stale_base(self) -> int:
        return self.failures_base + len(TRANSPORTS) * len(REASONS)

    def stale(self, event_id: int) -> int:
        """Pairs of `event_id` dropped as stale (older than engine.max_delay_ms)."""
        return self.stale_base + event_id

    @property
    def batch_base(self) -> int:
        """len(BATCH_BUCKETS)+1 bucket counts (last = +Inf), then the sum."""
        return self.stale_base + self.max_events

    @property
    def latency_base(self) -> int:
        """len(LATENCY_BUCKETS)+1 bucket counts (last = +Inf), then the sum in ns."""
        return self.batch_base + len(BATCH_BUCKETS) + 2

    @property
    def filtered_base(self) -> int:
        return self.latency_base + len(LATENCY_BUCKETS_NS) + 2

    def filtered(self, event_id: int) -> int:
        """Pairs of `event_id` a subscription's filter kept from being sent."""
        return self.filtered_base + event_id

    @property
    def group_base(self) -> int:
        return self.filtered_base + self.max_events

    def group(self, slot: int, which: int) -> int:
        """Group slot `slot` (engine.routing assigns them, never reused): which 0 =
        datagrams passed on to another member (failovers), 1 = members down now."""
        return self.group_base + 2 * slot + which

    @property
    def size(self) -> int:
        return self.group_base + 2 * GROUP_SLOTS


def region_words(layout: CounterLayout) -> int:
    return REGION_HEADER_WORDS + 2 * JOURNAL_MAX + layout.size + 2 * SUBSCRIBER_SLOTS


def block_size(workers: int, layout: CounterLayout) -> int:
    return 8 * (BLOCK_HEADER_WORDS + workers * region_words(layout))


class CounterBlock:
    """A view of the counter block; `region(k)` is worker k's `Region`."""

    def __init__(self, buf: memoryview) -> None:
        self.words = buf.cast("Q")
        if self.words[0] != COUNTERS_MAGIC:
            raise ValueError("not an event-datagram counter block (bad magic)")
        version = self.words[1] & 0xFFFFFFFF
        if version != COUNTERS_VERSION:
            raise ValueError(f"counter block version {version}, expected {COUNTERS_VERSION}")
        self.workers = int(self.words[2])
        self.region_words = int(self.words[3])
        self.layout = CounterLayout(int(self.words[4]))
        self._regions: dict[int, Region] = {}

    @staticmethod
    def format(buf: memoryview, workers: int, max_events: int, owner_pid: int) -> None:
        layout = CounterLayout(max_events)
        words = buf.cast("Q")
        words[1] = COUNTERS_VERSION | (BLOCK_HEADER_WORDS * 8) << 32
        words[2] = workers
        words[3] = region_words(layout)
        words[4] = max_events
        words[5] = owner_pid
        words[0] = COUNTERS_MAGIC
        words.release()

    @property
    def owner_pid(self) -> int:
        return int(self.words[5])

    def region(self, worker: int) -> Region:
        region = self._regions.get(worker)
        if region is None:
            if not 0 <= worker < self.workers:
                raise IndexError(f"worker {worker}: the block has {self.workers} regions")
            start = BLOCK_HEADER_WORDS + worker * self.region_words
            words = self.words[start : start + self.region_words]
            region = self._regions[worker] = Region(words, self.layout)
        return region

    def release(self) -> None:
        """Drop every view into the segment (regions included) so it can be closed."""
        for region in self._regions.values():
            region.release()
        self._regions.clear()
        self.words.release()


class Region:
    """One worker's region: header words, the journal, and its counters.

    The worker writes it (`mark_ready`, `beat`, `mark_sending`, `commit`); the
    supervisor and the producer read it, and the supervisor resets it between
    two workers (`mark_booting`, `recover`).
    """

    def __init__(self, words: memoryview, layout: CounterLayout) -> None:
        self.words = words
        self.layout = layout
        self.base = REGION_HEADER_WORDS + 2 * JOURNAL_MAX
        self.subscriber_base = self.base + layout.size
        self._slots = words[self.subscriber_base : self.subscriber_base + 2 * SUBSCRIBER_SLOTS]

    def release(self) -> None:
        self._slots.release()
        self.words.release()

    # -- the header: who serves this region, and how it is doing --------------------------
    @property
    def pid(self) -> int:
        return int(self.words[_PID])

    @property
    def state(self) -> int:
        return int(self.words[_STATE])

    @property
    def generation(self) -> int:
        """1 + restarts of this region's worker (0 before the first one was ready)."""
        return int(self.words[_GENERATION])

    @property
    def heartbeat_ns(self) -> int:
        """time.monotonic_ns() of the worker's last sign of progress."""
        return int(self.words[_HEARTBEAT])

    def mark_booting(self) -> None:
        """Supervisor, before spawning a worker: not ready yet, heart reset to now."""
        words = self.words
        words[_HEARTBEAT] = time.monotonic_ns()
        words[_PID] = 0
        words[_STATE] = STATE_BOOTING

    def mark_ready(self, pid: int) -> None:
        words = self.words
        words[_PID] = pid
        words[_GENERATION] += 1
        words[_HEARTBEAT] = time.monotonic_ns()
        words[_STATE] = STATE_READY

    def mark_exited(self) -> None:
        self.words[_STATE] = STATE_EXITED

    def beat(self, now_ns: int) -> None:
        self.words[_HEARTBEAT] = now_ns

    def mark_sending(self, upto: int) -> None:
        """The batch ending at ring position `upto` is being sent (the in-flight marker)."""
        self.words[_SENDING_UPTO] = upto

    # -- counters -------------------------------------------------------------------------
    def counter(self, index: int) -> int:
        return int(self.words[self.base + index])

    def counters(self) -> list[int]:
        return self.words[self.base : self.base + self.layout.size].tolist()

    def scalars(self, values: list[int]) -> dict[str, int]:
        """The named scalar counters (SCALARS) from a `counters()` list."""
        base = self.layout.scalar_base
        return {name: values[base + k] for k, name in enumerate(SCALARS)}

    def group_counts(self, slot: int) -> tuple[int, int]:
        """(failovers, members down) of group slot `slot`; (0, 0) for no slot."""
        if slot < 0:
            return 0, 0
        lay = self.layout
        return self.counter(lay.group(slot, 0)), self.counter(lay.group(slot, 1))

    def failures(self, values: list[int]) -> dict[tuple[str, str], int]:
        """Send failures by (transport, reason) from a `counters()` list."""
        lay = self.layout
        return {
            (transport, reason): values[lay.failure(t, r)]
            for t, transport in enumerate(TRANSPORTS)
            for r, reason in enumerate(REASONS)
        }

    # -- per-subscriber slots (written outside the journal) -------------------------------
    def count_subscriber(self, slot: int, sent: int, failed: int) -> None:
        slots = self._slots
        slots[2 * slot] += sent
        slots[2 * slot + 1] += failed

    def reset_subscriber(self, slot: int) -> None:
        """The producer, before it gives a freed slot to another subscriber (no worker
        writes it then: the one that did has dropped its subscriber)."""
        slots = self._slots
        slots[2 * slot] = 0
        slots[2 * slot + 1] = 0

    def subscriber_counts(self, slot: int) -> tuple[int, int]:
        """(datagrams sent, sends failed) of subscriber slot `slot`."""
        return int(self._slots[2 * slot]), int(self._slots[2 * slot + 1])

    def commit(self, values: list[int], touched: set[int], ring: Ring, read_pos: int) -> None:
        """Publish the touched counters together with the ring's new read position."""
        words = self.words
        base = self.base
        j = REGION_HEADER_WORDS
        for index in touched:
            words[j] = index
            words[j + 1] = values[index]
            j += 2
        words[_JOURNAL_LEN] = len(touched)
        words[_JOURNAL_UPTO] = read_pos  # the commit point
        for index in touched:
            words[base + index] = values[index]
        ring.set_read_pos(read_pos, values[self.layout.scalar("records_read")])
        words[_JOURNAL_UPTO] = 0

    def recover(self, ring: Ring) -> int:
        """Make a dead worker's region and ring consistent before a successor starts.

        Replays a committed journal, then counts the pairs of the batch that was in
        flight (they will be sent again). Returns those redelivered pairs.
        """
        words = self.words
        upto = int(words[_JOURNAL_UPTO])
        if upto:
            for i in range(int(words[_JOURNAL_LEN])):
                j = REGION_HEADER_WORDS + 2 * i
                words[self.base + words[j]] = words[j + 1]
            ring.set_read_pos(upto, self.counter(self.layout.scalar("records_read")))
            words[_JOURNAL_UPTO] = 0
        sending = int(words[_SENDING_UPTO])
        redelivered = 0
        if sending > ring.read_pos:
            redelivered = ring.pending_fanout(sending)
            index = self.base + self.layout.scalar("redelivered_pairs")
            words[index] += redelivered
        words[_SENDING_UPTO] = 0
        return redelivered
