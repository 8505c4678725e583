"""Single-producer / single-consumer ring of variable-length records in shared memory.

Why this is long: the ring's layout is written down once, with its writer and
its reader side by side, so a change to one is made with the other.

Layout, version 2 (all integers native little-endian, x86-64):

    Header, 256 bytes
      0   u64  magic             RING_MAGIC ("EDGRING" + 0x01)
      8   u32  version           RING_VERSION
      12  u32  header size       HEADER_SIZE (256)
      16  u64  capacity          data bytes, a multiple of 8
      24  ..63                   reserved (0)
      -- producer cache line --
      64  u64  write position    ever-increasing byte count; written by the producer only
      72  u64  records written   written by the producer only
      80  u64  drops             records the producer could not fit (ring full)
      88  ..127                  reserved
      -- consumer cache line --
      128 u64  read position     ever-increasing byte count; written by the consumer only
      136 u64  records read      written by the consumer only
      144 ..191                  reserved
      -- sleep cache line (written only when the consumer sleeps or wakes, so the
         producer's read of it on every raise stays a cache hit) --
      192 u64  sleep sequence    written by the consumer only: odd while it sleeps
      200 ..255                  reserved
    Data, `capacity` bytes, starting at offset 256

    Record, at data offset (position % capacity), 8-byte aligned
      0   u32  payload length    bytes
      4   u16  kind              KIND_EVENT, KIND_SUBSCRIBE, KIND_UNSUBSCRIBE, KIND_STOP, KIND_WRAP
      6   u16  flags             0
      8   u32  event id
      12  u32  fanout            subscribers of this event in this worker when queued
      16  u64  raise timestamp   time.monotonic_ns() of the raise
      24       payload           padded with zeros to a multiple of 8

A record never straddles the end of the data area: when it does not fit, the
producer writes a KIND_WRAP header there (or, when fewer than 24 bytes remain,
nothing) and the record starts at data offset 0; the consumer skips to 0 the same way.

Publication order. The producer copies the payload and the record header, then
stores the new write position; the consumer loads the write position, then
reads the records before it, and stores its read position only when done with
them. Each position is one aligned 8-byte store/load through a native `'Q'`
memoryview (a single `mov`; the `'<Q'` struct path would copy byte by byte).
This relies on x86-64 ordering: stores are not reordered with other stores,
loads not with other loads. `check_architecture()` refuses to run elsewhere.
A batch of records may be staged (written, position not stored) and published
with one store of the write position (`stage()`, `publish()`): the consumer sees
the whole batch or none of it. Records written but not yet published still take
room, so a producer publishes before it waits for room (`append()` with a wait).

Sleeping and waking (no lost wake-up, no system call while the consumer is
awake). An idle consumer makes the sleep sequence odd, crosses a full barrier
(a lock's locked instruction), looks at the write position once more, and only
if nothing came waits on the ring's doorbell (shm/doorbell.py: an eventfd,
which keeps a ring that lands before the wait). The producer, after publishing,
crosses a full barrier (the engine releases its raise-path lock), then reads the
sleep sequence, and rings only when it is odd and not already rung for it.
Either the producer sees the odd sequence and rings, or its write position was
visible to the consumer's last look: one of the two always holds, under x86-64
ordering (the barriers stop each side's store from passing its later load).
"""

from __future__ import annotations

import array
import bisect
import itertools
import platform
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from engine.shm.doorbell import Doorbell

RING_MAGIC: Final = int.from_bytes(b"EDGRING\x01", "little")
RING_VERSION: Final = 2
HEADER_SIZE: Final = 256
RECORD_HEADER: Final = struct.Struct("<IHHIIQ")
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size  # 24

KIND_EVENT: Final = 1
KIND_SUBSCRIBE: Final = 2
KIND_UNSUBSCRIBE: Final = 3
KIND_STOP: Final = 4
KIND_WRAP: Final = 0xFFFF

# Indexes into the header viewed as u64 words (byte offset / 8).
_MAGIC, _VERSION_SIZE, _CAPACITY = 0, 1, 2
_WRITE_POS, _RECORDS_WRITTEN, _DROPS = 8, 9, 10
_READ_POS, _RECORDS_READ = 16, 17
_SLEEP_SEQ: Final = 24
# The consumer's full barrier before its last look (acquiring a lock is a locked
# instruction on x86-64).
_FENCE: Final = threading.Lock()
_PAD: Final = bytes(8)
# read_batch reads a run of records of one length at C speed from this many on;
# the struct that unpacks a run's headers, per record stride.
BULK_MIN: Final = 4
_RUN_STRUCTS: dict[int, struct.Struct] = {}
# A producer waiting for room waits until this fraction of the ring is free
# (32 KiB of the default 8 MiB: ~2.5 ms of a worker's sending at full rate).
WAIT_FOR_ROOM_FRACTION: Final = 256  # a payload's padding to a multiple of 8 is a slice of it


class ControlPayload(msgspec.Struct, array_like=True, frozen=True):
    """The payload of a subscribe/unsubscribe record (msgpack): one subscriber."""

    key: str
    transport: str  # "udp" | "unix"
    family: int
    sockaddr: str | list[str | int]  # a UNIX path, or [host, port(, flowinfo, scope)]
    slot: int = -1  # per-subscriber counter slot in the worker's region; -1 = none
    # Routing (engine.targets), all empty for a plain subscriber: a policy of ""
    # is one socket (this one); "SINGLE" one socket with a filter; otherwise a
    # group of `members` (each a plain payload) under PARALLEL, FAILOVER,
    # ROUND-ROBIN or HASH (by the top-level param `hash_param`).
    policy: str = ""
    members: list[ControlPayload] = []
    conditions: list[tuple[str, str]] = []  # ANDed (name, fnmatch pattern)
    hash_param: str = ""
    failover_s: float = 30.0  # a failed member is skipped this long
    group: int = -1  # the group's counter slot (counters.GROUP_SLOTS); -1 = none

    def address(self) -> str | tuple[str | int, ...]:
        """The sockaddr as socket.connect() takes it."""
        return self.sockaddr if isinstance(self.sockaddr, str) else tuple(self.sockaddr)


CONTROL_ENCODER: Final = msgspec.msgpack.Encoder()
CONTROL_DECODER: Final = msgspec.msgpack.Decoder(ControlPayload)


_X86_64: Final = frozenset({"x86_64", "amd64", "AMD64"})


def check_architecture() -> None:
    """Refuse to run where plain stores/loads could be reordered (see module doc)."""
    machine = platform.machine()
    if machine not in _X86_64:
        raise RuntimeError(
            f"event-datagram's shared-memory ring relies on x86-64 store ordering; "
            f"this machine is {machine!r}, which is not supported"
        )


def align8(n: int) -> int:
    return (n + 7) & ~7


def segment_size(capacity: int) -> int:
    return HEADER_SIZE + capacity


@dataclass(frozen=True, slots=True)
class RingStatistics:
    capacity: int
    used_bytes: int
    records_written: int
    records_read: int
    drops: int


class Ring:
    """A view of one ring segment; the producer and the consumer each hold one."""

    def __init__(self, buf: memoryview, doorbell: Doorbell | None = None) -> None:
        self.buf = buf
        # The sleeper's eventfd: the consumer waits on it, the producer rings it. A
        # ring without one has a consumer that never sleeps (tests, tools).
        self.doorbell = doorbell
        self.words = buf[:HEADER_SIZE].cast("Q")
        if self.words[_MAGIC] != RING_MAGIC:
            raise ValueError("not an event-datagram ring (bad magic)")
        version = self.words[_VERSION_SIZE] & 0xFFFFFFFF
        if version != RING_VERSION:
            raise ValueError(f"ring layout version {version}, expected {RING_VERSION}")
        self.capacity: int = self.words[_CAPACITY]
        self.data = buf[HEADER_SIZE : HEADER_SIZE + self.capacity]
        # Producer-side copies (only the producer's Ring object uses them).
        self._wpos = int(self.words[_WRITE_POS])
        self._rpos = int(self.words[_READ_POS])
        self._written = int(self.words[_RECORDS_WRITTEN])
        self._published = self._wpos  # the write position the consumer can see
        self._woken = 0  # producer: the sleep sequence it last woke
        # Consumer-side: how many records read_batch's fast path looks at (_read_run).
        self._run_guess = BULK_MIN
        self._run_pairs = 0

    @staticmethod
    def format(buf: memoryview, capacity: int) -> None:
        """Write a fresh header into a zeroed segment of `segment_size(capacity)` bytes."""
        check_architecture()
        if capacity % 8 or capacity < 4096:
            raise ValueError(f"ring capacity {capacity}: must be a multiple of 8, >= 4096")
        words = buf[:HEADER_SIZE].cast("Q")
        words[_VERSION_SIZE] = RING_VERSION | (HEADER_SIZE << 32)
        words[_CAPACITY] = capacity
        words[_MAGIC] = RING_MAGIC
        words.release()

    def release(self) -> None:
        """Drop every view into the segment so it can be closed."""
        self.data.release()
        self.words.release()

    # -- sleeping and waking (see the module docstring) -----------------------------
    def sleep(self, read_pos: int) -> None:
        """Consumer, with nothing left before `read_pos`: sleep until the producer
        publishes more and rings. Needs a doorbell."""
        doorbell = self.doorbell
        if doorbell is None:
            raise RuntimeError("this ring has no doorbell: its consumer cannot sleep")
        words = self.words
        seq = int(words[_SLEEP_SEQ])
        # The next odd value: asleep. (A consumer killed in its sleep left it odd: its
        # successor must not make it even by going to sleep, or no one would ring.)
        asleep = seq + 2 if seq & 1 else seq + 1
        words[_SLEEP_SEQ] = asleep
        try:
            with _FENCE:  # the odd sequence is visible before the last look below
                pass
            if words[_WRITE_POS] == read_pos:
                doorbell.wait()
        finally:
            words[_SLEEP_SEQ] = asleep + 1  # even: awake

    @property
    def asleep(self) -> bool:
        """The consumer sleeps now (or is about to)."""
        return bool(self.words[_SLEEP_SEQ] & 1)

    @property
    def sleeps(self) -> int:
        """How many times the consumer has gone to sleep."""
        return (int(self.words[_SLEEP_SEQ]) + 1) // 2

    def wake_if_sleeping(self) -> bool:
        """Producer, after a full barrier that follows its last append: wake the
        consumer if it sleeps (one system call per sleep, none while it is awake)."""
        seq = self.words[_SLEEP_SEQ]
        if not seq & 1 or seq == self._woken:
            return False
        self._woken = seq
        if self.doorbell is not None:
            self.doorbell.ring()
        return True

    def stalled_sleep(self) -> tuple[int, int] | None:
        """(sleep sequence, read position) when the consumer sleeps with records
        published before it, else None: a wake-up was lost if the same pair is seen
        again a while later (the supervisor then rings: `nudge()`)."""
        seq = int(self.words[_SLEEP_SEQ])
        read_pos = int(self.words[_READ_POS])
        if not seq & 1 or self.words[_WRITE_POS] == read_pos:
            return None
        return seq, read_pos

    def nudge(self) -> None:
        """Ring the doorbell whatever the sleep sequence says (the lost-wake-up net)."""
        if self.doorbell is not None:
            self.doorbell.ring()

    # -- positions ----------------------------------------------------------------
    @property
    def write_pos(self) -> int:
        return int(self.words[_WRITE_POS])

    @property
    def published(self) -> int:
        """Producer: the write position it last published (its own copy)."""
        return self._published

    @property
    def read_pos(self) -> int:
        return int(self.words[_READ_POS])

    def max_record(self) -> int:
        """Largest payload that can ever fit (half the ring, so a wrap always fits)."""
        return self.capacity // 2 - RECORD_HEADER_SIZE

    # -- producer -------------------------------------------------------------------
    def try_append(
        self,
        kind: int,
        event_id: int,
        fanout: int,
        ts_ns: int,
        payload: bytes,
        count_drop: bool = True,
    ) -> bool:
        """Append one record and publish it; False (and, with `count_drop`, a counted
        drop) when it does not fit now.

        The producer keeps its own copy of the write position and a possibly stale
        copy of the read position (re-read only when the ring looks full), so the
        consumer's cache line is not touched on every append.
        """
        # stage() and publish() in one body: this is the single raise's hot path.
        n = len(payload)
        size = RECORD_HEADER_SIZE + ((n + 7) & ~7)
        wpos = self._wpos
        cap = self.capacity
        off = wpos % cap
        tail = cap - off
        need = size + tail if tail < size else size
        if need > cap - (wpos - self._rpos):
            self._rpos = int(self.words[_READ_POS])
            if need > cap - (wpos - self._rpos):
                if count_drop:
                    self.words[_DROPS] += 1
                return False
        data = self.data
        if tail < size:
            if tail >= RECORD_HEADER_SIZE:
                RECORD_HEADER.pack_into(data, off, 0, KIND_WRAP, 0, 0, 0, 0)
            off = 0
        data[off + RECORD_HEADER_SIZE : off + RECORD_HEADER_SIZE + n] = payload
        RECORD_HEADER.pack_into(data, off, n, kind, 0, event_id, fanout, ts_ns)
        words = self.words
        self._written += 1
        words[_RECORDS_WRITTEN] = self._written
        self._wpos = self._published = wpos = wpos + need
        words[_WRITE_POS] = wpos  # publish this record and any staged before it
        return True

    def stage(self, kind: int, event_id: int, fanout: int, ts_ns: int, payload: bytes) -> bool:
        """Write one record after the ones written so far without publishing it (the
        consumer does not see it until `publish()`); False, counting nothing, when it
        does not fit now (the caller counts the drop: `note_drop()`, or waits with
        `append()`, which sees the staged records).

        A batch of records staged, then published once, reaches the consumer as one
        move of the write position: the ring has a single writer, so nothing else
        can come between them.
        """
        n = len(payload)
        size = RECORD_HEADER_SIZE + ((n + 7) & ~7)
        wpos = self._wpos
        cap = self.capacity
        off = wpos % cap
        tail = cap - off
        need = size + tail if tail < size else size
        if need > cap - (wpos - self._rpos):
            self._rpos = int(self.words[_READ_POS])
            if need > cap - (wpos - self._rpos):
                return False
        data = self.data
        if tail < size:
            if tail >= RECORD_HEADER_SIZE:
                RECORD_HEADER.pack_into(data, off, 0, KIND_WRAP, 0, 0, 0, 0)
            off = 0
        data[off + RECORD_HEADER_SIZE : off + RECORD_HEADER_SIZE + n] = payload
        RECORD_HEADER.pack_into(data, off, n, kind, 0, event_id, fanout, ts_ns)
        self._written += 1
        self._wpos = wpos + need
        return True

    def stage_many(
        self,
        event_id: int,
        fanout: int,
        ts_ns: int,
        payloads: Sequence[bytes],
        start: int,
        stop: int,
    ) -> int:
        """stage() event records for payloads[start:stop], all of one event id,
        fan-out and timestamp, with one copy into the ring: returns how many were
        staged, a prefix (0 to stop - start). It stops where the next record would
        not fit before the end of the data area or in the free room as last seen;
        stage() the rest one at a time (it wraps, and re-reads the read position)."""
        cap = self.capacity
        wpos = self._wpos
        off = wpos % cap
        room = min(cap - off, cap - (wpos - self._rpos))
        pack = RECORD_HEADER.pack
        parts: list[bytes] = []
        add = parts.append
        total = 0
        last = -1
        header = pad = b""
        size = 0
        i = start
        while i < stop:
            payload = payloads[i]
            n = len(payload)
            if n != last:
                last = n
                header = pack(n, KIND_EVENT, 0, event_id, fanout, ts_ns)
                pad = _PAD[: -n & 7]
                size = RECORD_HEADER_SIZE + n + len(pad)
            if total + size > room:
                break
            add(header)
            add(payload)
            add(pad)
            total += size
            i += 1
        if total:
            self.data[off : off + total] = b"".join(parts)
            self._written += i - start
            self._wpos = wpos + total
        return i - start

    def publish(self) -> bool:
        """Make every staged record visible to the consumer (the record count, then
        the write position: one store each); False (nothing done) when nothing was
        staged."""
        if self._wpos == self._published:
            return False
        self.words[_RECORDS_WRITTEN] = self._written
        self.words[_WRITE_POS] = self._published = self._wpos  # readable from now on
        return True

    def note_drop(self) -> None:
        """Count a record the producer could not fit (after `stage()` said no)."""
        self.words[_DROPS] += 1

    def append(
        self,
        kind: int,
        event_id: int,
        fanout: int,
        ts_ns: int,
        payload: bytes,
        wait_s: float = 0.0,
    ) -> bool:
        """Append, waiting up to `wait_s` for room; the drop is counted once. Staged
        records are published with it; publish them (and wake the consumer) before
        waiting, or their room is waited for in vain.

        A wait lasts until a slice of the ring is free (WAIT_FOR_ROOM_FRACTION), not
        just this record's room, so a producer held back by its consumer sleeps once
        per few hundred records instead of once per few (each sleep costs CPU)."""
        if self.try_append(kind, event_id, fanout, ts_ns, payload, False):
            return True
        if len(payload) > self.max_record():
            raise ValueError(f"record of {len(payload)} bytes exceeds the ring's maximum")
        if wait_s <= 0:
            self.note_drop()
            return False
        deadline = time.monotonic() + wait_s
        want = max(self._need(len(payload)), self.capacity // WAIT_FOR_ROOM_FRACTION)
        while time.monotonic() < deadline:
            time.sleep(0.0001)
            if self.capacity - (self._wpos - self.words[_READ_POS]) >= want:
                break
        return self.try_append(kind, event_id, fanout, ts_ns, payload)

    def _need(self, payload_len: int) -> int:
        """Bytes a record of `payload_len` takes at the write position (a wrap included)."""
        size = RECORD_HEADER_SIZE + align8(payload_len)
        tail = self.capacity - self._wpos % self.capacity
        return size + (tail if tail < size else 0)

    # -- consumer -------------------------------------------------------------------
    def read_batch(
        self,
        rpos: int,
        wpos: int,
        batch_max: int,
        iov: memoryview,
        base_address: int,
        eids: list[int],
        lengths: list[int],
        stamps: list[int],
        stale_before_ns: int = 0,
        stale: list[tuple[int, int]] | None = None,
        max_pairs: int = 1 << 62,
        min_events: int = 1,
    ) -> tuple[int, int, int, int, tuple[int, int, int, int] | None]:
        """The consumer's hot path: the next batch of records in [rpos, wpos).

        Reads up to `batch_max` event records, fewer once their fan-out reaches
        `max_pairs` (so a batch to thousands of subscribers still ends, and
        commits its progress, every so many datagrams) -- but never fewer than
        `min_events`, so each subscriber's sendmmsg still carries several
        datagrams however large the fan-out. For event record i it points iovec
        i (`iov`: u64 (address, length) pairs; `base_address`: the address of this
        ring's data area in the reader's mapping) at the payload inside the ring,
        and appends its event id, payload length and raise timestamp to `eids`,
        `lengths` and `stamps` (cleared first). A control record ends the batch:
        when it comes first it is the batch (consumed, returned as `control`);
        otherwise it is left for the next one, so it applies after the events
        before it are sent. An event record raised before `stale_before_ns`
        (time.monotonic_ns(); 0 = none is stale) is consumed without being handed
        out: its (event id, fan-out) goes to `stale` instead.

        Returns (end position, records consumed, fan-out of the events consumed
        (stale ones included), events handed out, control) where control is
        (kind, event id, payload offset, payload length) or None; read it with
        `control_payload(offset, length)`.
        """
        data = self.data
        cap = self.capacity
        unpack = RECORD_HEADER.unpack_from
        eids.clear()
        lengths.clear()
        stamps.clear()
        pos = rpos
        records = consumed = n = 0
        control: tuple[int, int, int, int] | None = None
        last_length = -1
        # Stale records are skipped cheaply, but a round stays bounded all the same.
        while (
            pos < wpos
            and n < batch_max
            and records < 16 * batch_max
            and (consumed < max_pairs or n < min_events)
        ):
            off = pos % cap
            tail = cap - off
            if tail < RECORD_HEADER_SIZE:
                pos += tail
                continue
            length, kind, _flags, eid, fanout, ts = unpack(data, off)
            if kind == KIND_WRAP:
                pos += tail
                continue
            stride = RECORD_HEADER_SIZE + ((length + 7) & ~7)
            if kind != KIND_EVENT:
                if n == 0:
                    control = (kind, eid, off + RECORD_HEADER_SIZE, length)
                    records += 1
                    pos += stride
                break
            if ts < stale_before_ns and stale is not None:
                stale.append((eid, fanout))
                consumed += fanout
                records += 1
                pos += stride
                continue
            if self._run_guess >= BULK_MIN and wpos - pos >= BULK_MIN * stride:
                took = self._read_run(
                    off, stride, length, min(wpos - pos, tail) // stride, batch_max - n,
                    max_pairs - consumed, min_events - n, stale_before_ns, iov, n,
                    base_address, eids, lengths, stamps,
                )  # fmt: skip
                if took:
                    n += took
                    records += took
                    consumed += self._run_pairs
                    pos += took * stride
                    continue
            elif length == last_length:
                self._run_guess += 1  # a run of one length again: try reading it whole
            last_length = length
            iov[2 * n] = base_address + off + RECORD_HEADER_SIZE
            iov[2 * n + 1] = length
            eids.append(eid)
            lengths.append(length)
            stamps.append(ts)
            consumed += fanout
            n += 1
            records += 1
            pos += stride
        return pos, records, consumed, n, control

    def _read_run(
        self,
        off: int,
        stride: int,
        length: int,
        fit: int,
        room: int,
        pairs_left: int,
        min_left: int,
        stale_before_ns: int,
        iov: memoryview,
        n: int,
        base_address: int,
        eids: list[int],
        lengths: list[int],
        stamps: list[int],
    ) -> int:
        """read_batch's fast path: the event records from data offset `off` on that
        share the first one's payload length (so they lie `stride` apart), read at C
        speed: their headers unpacked in one call, checked in one pass, the iovec
        table and the lists filled with slice assignments. The first record is
        known to be an event of `length` bytes that is not stale. Returns how many
        it took (0: read them one at a time); their fan-out is left in _run_pairs.

        It takes what the per-record loop would: not beyond `fit` (the published
        records before the end of the data area), `room` (the batch), a record of
        another length or kind, a stale one, or the batch's datagram budget
        (`pairs_left`, past `min_left` events). `_run_guess` bounds how many it
        looks at, and adapts: it doubles while runs go on, and falls to 1 (off) when
        lengths keep changing, so mixed traffic pays one short look, not many."""
        k = min(self._run_guess, fit, room)
        if k < BULK_MIN:
            return 0
        run = _RUN_STRUCTS.get(stride)
        if run is None:
            if len(_RUN_STRUCTS) > 256:
                _RUN_STRUCTS.clear()
            run = _RUN_STRUCTS[stride] = struct.Struct(f"<IHHIIQ{stride - RECORD_HEADER_SIZE}x")
        cols = list(zip(*run.iter_unpack(self.data[off : off + k * stride]), strict=True))
        lens, kinds, eid_col, fanouts, tss = cols[0], cols[1], cols[3], cols[4], cols[5]
        p = k
        if lens.count(length) != k or kinds.count(KIND_EVENT) != k:
            p = 1
            while p < k and lens[p] == length and kinds[p] == KIND_EVENT:
                p += 1
        if stale_before_ns and min(tss[:p]) < stale_before_ns:  # (the first is not)
            p = next(j for j in range(p) if tss[j] < stale_before_ns)
        self._run_guess = min(2 * self._run_guess, 1024) if p == k else (p if p >= BULK_MIN else 1)
        # Record j is taken while the fan-out before it is under the budget, or while
        # the batch has fewer than its minimum of events.
        before = list(itertools.accumulate(fanouts[:p], initial=0))
        p = min(p, max(bisect.bisect_left(before, pairs_left, 0, p), min_left))
        if p < 2:
            return 0
        first = base_address + off + RECORD_HEADER_SIZE
        iov[2 * n : 2 * (n + p) : 2] = array.array("Q", range(first, first + p * stride, stride))
        iov[2 * n + 1 : 2 * (n + p) + 1 : 2] = array.array("Q", (length,)) * p
        eids.extend(eid_col[:p])
        lengths.extend((length,) * p)
        stamps.extend(tss[:p])
        self._run_pairs = before[p]
        return p

    def control_payload(self, offset: int, length: int) -> ControlPayload:
        """Decode the payload of a subscribe/unsubscribe record found by read_batch."""
        return CONTROL_DECODER.decode(self.data[offset : offset + length])

    def set_read_pos(self, pos: int, records_read: int) -> None:
        """Release everything before `pos`; `records_read` is the new absolute total."""
        self.words[_RECORDS_READ] = records_read
        self.words[_READ_POS] = pos

    def records(self, start: int, end: int) -> list[tuple[int, int, int, int, int, int, int]]:
        """Decode the records in [start, end) as (pos, next_pos, kind, event_id, fanout,
        ts_ns, length). The slow path, for accounting and recovery, not for sending."""
        out = []
        pos = start
        cap = self.capacity
        while pos < end:
            off = pos % cap
            tail = cap - off
            if tail < RECORD_HEADER_SIZE:
                pos += tail
                continue
            length, kind, _flags, event_id, fanout, ts = RECORD_HEADER.unpack_from(self.data, off)
            if kind == KIND_WRAP:
                pos += tail
                continue
            nxt = pos + RECORD_HEADER_SIZE + align8(length)
            out.append((pos, nxt, kind, event_id, fanout, ts, length))
            pos = nxt
        return out

    def payload(self, pos: int, length: int) -> bytes:
        off = pos % self.capacity + RECORD_HEADER_SIZE
        return bytes(self.data[off : off + length])

    def pending_fanout(self, end: int | None = None) -> int:
        """Subscriber pairs in event records from the read position up to `end`
        (default: everything written). Call it where the producer is not writing."""
        stop = self.write_pos if end is None else end
        return sum(r[4] for r in self.records(self.read_pos, stop) if r[2] == KIND_EVENT)

    def statistics(self) -> RingStatistics:
        words = self.words
        rpos = words[_READ_POS]
        return RingStatistics(
            capacity=self.capacity,
            used_bytes=int(words[_WRITE_POS] - rpos),
            records_written=int(words[_RECORDS_WRITTEN]),
            records_read=int(words[_RECORDS_READ]),
            drops=int(words[_DROPS]),
        )
