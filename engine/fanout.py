"""The hot path the Engine delegates to: admission, ring staging, publish and wake.

`Fanout` owns the router (who holds whom), the workers' rings and counter
regions while running, and the hot lock that guards them. Both raise paths
(one event, a batch of already-encoded ones) admit an event to a worker's ring
by one rule: control records first, then the backlog bound
(engine.max_pending_datagrams), then room in the ring (dropped, counted, or
with the "wait" policy waited for a bounded time). The producer-side counters
live here, next to their one writer.

Accounting (checked by `EngineStatistics.check_identity`):
  events:  raised = oversize + dropped[no_subscribers] + dropped[ring_full] + queued
           (an event is "queued" when every target ring took it, "ring_full"
           when at least one did not)
  pairs, per worker:  queued = sent + failed + in ring
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from engine.errors import EngineError
from engine.options import EngineOptions
from engine.routing import Router
from engine.shm.counters import CounterLayout, Region
from engine.shm.ring import KIND_EVENT, KIND_STOP, ControlPayload, Ring
from engine.subscriptions import Change
from engine.wire import MAX_PAYLOAD

DROP_REASONS = ("ring_full", "no_subscribers")


class RaiseResult(NamedTuple):
    """What became of one raised event (a tuple: cheap to make on the hot path)."""

    event: str
    size: int  # payload bytes
    workers_queued: int  # rings that took it
    workers_dropped: int  # rings that were full
    pairs: int  # (event, subscriber) pairs queued

    @property
    def queued(self) -> bool:
        """True when every subscriber's worker took the event."""
        return self.workers_queued > 0 and self.workers_dropped == 0

    @property
    def no_subscribers(self) -> bool:
        return self.workers_queued == 0 and self.workers_dropped == 0


# RaiseResult's own constructor is a Python-level function (~0.1 us of the ~3 us a
# raise costs); the tuple's, given the class, builds the same object at C speed.
_new_result = tuple.__new__


def _runs(eids: Sequence[int]) -> list[tuple[int, int, int]]:
    """The runs of equal ids in `eids` as (id, start, end): one when all are equal
    (checked at C speed: the usual batch, one event type)."""
    n = len(eids)
    if not n:
        return []
    first = eids[0]
    if eids.count(first) == n:
        return [(first, 0, n)]
    runs = []
    start = 0
    for k in range(1, n):
        if eids[k] != eids[start]:
            runs.append((eids[start], start, k))
            start = k
    runs.append((eids[start], start, n))
    return runs


class Fanout:
    """The rings, the router and the hot lock; the raise paths under that lock.

    The raise path takes `hot` only, and nothing holds `hot` while it writes a
    file (the Engine's registry lock is always taken before it, never after).
    """

    def __init__(self, options: EngineOptions, clock: Callable[[], float]) -> None:
        self.hot = threading.RLock()
        # A full barrier inside `hot` (its acquire is a locked instruction): a batch
        # that must wait for room publishes, crosses it, then wakes sleeping workers.
        self._fence = threading.Lock()
        self._waited: list[Ring] = []  # in a batch: rings that append() published
        self._clock = clock  # expiry's clock: steady, in wall seconds
        self.router: Router | None = None  # while running
        self.regions: list[Region] = []  # the workers' counter regions, while running
        self.accepting = False
        self.failure: str | None = None
        # Producer-side counters (main process only; written under `hot`).
        self.raised: list[int] = [0] * options.max_events
        self.oversize: list[int] = [0] * options.max_events
        self.events_queued = 0
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self._max_pending = options.max_pending_datagrams
        self._i_consumed = CounterLayout(options.max_events).scalar("pairs_consumed")
        self._wait_s = (
            options.full_ring_wait_ms / 1000.0 if options.full_ring_policy == "wait" else 0.0
        )
        self._failover_s = options.failover_timeout_s
        # wake_ahead: when each event id was last raised, and the pause after which
        # its workers may be asleep (a worker sleeps after engine.idle_poll_ms idle).
        self._raised_at: list[int] = [0] * options.max_events
        self._pause_ns = int(options.idle_poll_ms * 1e6)

    # -- life cycle (called by the Engine) -----------------------------------------------
    def attach(self, rings: list[Ring], regions: list[Region]) -> None:
        """Route to these workers' rings (start())."""
        with self.hot:
            self.regions = regions
            self.router = Router(rings, regions)
            self.router.failover_s = self._failover_s

    def stop_accepting(self, stop_rings: list[Ring]) -> None:
        """Refuse new events, hand pending control records over, and append a STOP
        record to each of `stop_rings` (waiting a bounded time for room)."""
        with self.hot:
            self.accepting = False
            if self.router is not None:
                self.router.flush()
            for ring in stop_rings:
                ring.append(KIND_STOP, 0, 0, time.monotonic_ns(), b"", wait_s=0.5)

    def detach(self) -> None:
        """Forget the rings and regions (before the supervisor unmaps them)."""
        self.regions = []
        self.router = None

    # -- the raise paths -------------------------------------------------------------------
    def count_oversize(self, eid: int) -> None:
        """An event refused for its size: raised and oversize."""
        with self.hot:
            self.raised[eid] += 1
            self.oversize[eid] += 1

    def raise_one(self, name: str, eid: int, payload: bytes, ts: int) -> RaiseResult:
        """Queue one encoded event (at most MAX_PAYLOAD bytes), raised at `ts`
        (wake_ahead's time), to every worker that holds a subscriber of `eid`.
        Raises EngineError when not accepting."""
        with self.hot:
            if not self.accepting:
                raise EngineError(self.failure or "engine is not running")
            result = self._queue(name, eid, payload, ts)
        # Releasing the lock was a full barrier (a locked instruction), so a worker
        # that went to sleep before our append is seen asleep now (shm/ring.py).
        if result.workers_queued:
            self._wake(eid)
        return result

    def raise_batch(self, eids: Sequence[int], payloads: Sequence[bytes]) -> int:
        """Engine.raise_encoded_batch: returns how many were oversize."""
        with self.hot:
            if not self.accepting:
                raise EngineError(self.failure or "engine is not running")
            oversize, touched = self._queue_batch(eids, payloads)
        # Releasing the lock was the barrier (see raise_one).
        try:
            for ring in touched:
                ring.wake_if_sleeping()
        except ValueError:  # stop() unmapped the rings meanwhile: no one to wake
            pass
        return oversize

    def wake_ahead(self, eid: int) -> int:
        """Before an event of `eid` is encoded and queued: after a pause, ring the
        sleeping workers that will take it, so their wake-up (~70 us from an idle CPU
        on the 2-core development machine) overlaps the producer's encoding and
        queueing (~100 us of cold Python after a pause) instead of following them.
        A worker woken this way spins briefly for the record (workers/worker.py). The
        usual wake after the append stays: a worker that gave up waiting and slept
        again is rung then. Returns the time it read (monotonic ns), the event's
        raise time: at a steady rate this costs nothing more than that clock read."""
        now = time.monotonic_ns()
        raised_at = self._raised_at
        if now - raised_at[eid] >= self._pause_ns:
            self._wake(eid)
        raised_at[eid] = now  # unlocked: a race costs one early wake, no more
        return now

    def _wake(self, eid: int) -> None:
        """Wake the sleeping workers that hold subscribers of `eid` (no system call
        for a worker that is awake)."""
        router = self.router
        if router is None:
            return
        rings = router.rings
        try:
            for worker, _ in router.targets.get(eid, ()):
                rings[worker].wake_if_sleeping()
        except ValueError:  # stop() unmapped the rings meanwhile: no one to wake
            pass

    def wake_all(self) -> None:
        """After control records (outside `hot`: its release is the barrier)."""
        router = self.router
        if router is None:
            return
        with contextlib.suppress(ValueError):  # unmapped by stop() meanwhile
            for ring in router.rings:
                ring.wake_if_sleeping()

    def _queue(self, name: str, eid: int, payload: bytes, ts: int) -> RaiseResult:
        self.raised[eid] += 1
        router = self.router
        if router is not None and router.next_expiry <= (now := self._clock()):
            router.expire(now)  # an expired subscriber receives nothing more
        targets = router.targets.get(eid) if router is not None else None
        if not targets or router is None:
            self.drops["no_subscribers"] += 1
            return _new_result(RaiseResult, (name, len(payload), 0, 0, 0))
        admit = self._admit
        queued = dropped = pairs = 0
        for worker, fanout in targets:
            if admit(worker, eid, fanout, ts, payload, False):
                queued += 1
                pairs += fanout
            else:
                dropped += 1
        if dropped:
            self.drops["ring_full"] += 1
        else:
            self.events_queued += 1
        return _new_result(RaiseResult, (name, len(payload), queued, dropped, pairs))

    def _queue_batch(
        self, eids: Sequence[int], payloads: Sequence[bytes]
    ) -> tuple[int, list[Ring]]:
        """_queue for a batch (under `hot`), a run of events of one id at a time:
        per target worker, the run's records are staged with one Ring.stage_many;
        whatever that does not take (a full ring, the ring's end, a backlog near
        engine.max_pending_datagrams, an oversize payload) goes one event at a
        time through _admit, the rule _queue applies. Returns
        (oversize, the rings whose write position moved, to wake)."""
        router = self.router
        raised = self.raised
        if router is None:  # not while accepting; counted as _queue would
            for eid in eids:
                raised[eid] += 1
            self.drops["no_subscribers"] += len(eids)
            return 0, []
        if router.next_expiry <= (now := self._clock()):
            router.expire(now)  # an expired subscriber receives nothing more
        targets_of = router.targets
        rings = router.rings
        routes = router.routes
        ts = time.monotonic_ns()
        bound = self._max_pending
        self._waited = []
        n = len(eids)
        first = eids[0] if n else 0
        runs = ((first, 0, n),) if eids.count(first) == n else _runs(eids)
        oversize = no_subscribers = ring_full = queued = 0
        for eid, i, j in runs:
            m = j - i
            raised[eid] += m
            big: set[int] | tuple[()] = ()
            if max(map(len, payloads if m == n else payloads[i:j])) > MAX_PAYLOAD:
                big = {k for k in range(i, j) if len(payloads[k]) > MAX_PAYLOAD}
                self.oversize[eid] += len(big)
                oversize += len(big)
            targets = targets_of.get(eid)
            if not targets:
                no_subscribers += m - len(big)
                continue
            failed: set[int] | None = None  # events some target ring did not take
            for worker, fanout in targets:
                route = routes[worker]
                k = i
                if not (
                    big
                    or route.pending  # control records first
                    or (bound and route.pairs_queued - route.consumed_seen + fanout * m > bound)
                ):
                    k += rings[worker].stage_many(eid, fanout, ts, payloads, i, j)
                    route.pairs_queued += fanout * (k - i)
                for e in range(k, j):
                    if e not in big and not self._admit(worker, eid, fanout, ts, payloads[e], True):
                        if failed is None:
                            failed = set()
                        failed.add(e)
            full = len(failed) if failed else 0
            ring_full += full
            queued += m - len(big) - full
        touched = [ring for ring in rings if ring.publish()]
        if self._waited:  # published while waiting for room (see _admit)
            touched.extend(r for r in self._waited if r not in touched)
        self.events_queued += queued
        drops = self.drops
        drops["ring_full"] += ring_full
        drops["no_subscribers"] += no_subscribers
        return oversize, touched

    def _admit(
        self, worker: int, eid: int, fanout: int, ts: int, payload: bytes, batch: bool
    ) -> bool:
        """The admission rule of both raise paths: one event record for `worker` (its
        `fanout` subscribers of `eid`), counted in its route; True if its ring took
        it. Control records first (an event must not overtake a pending subscribe or
        unsubscribe); then the backlog bound (engine.max_pending_datagrams: a backlog
        of datagrams, not only of bytes); then room in the ring: dropped, or with the
        "wait" policy waited for a bounded time. In a batch (`batch`) the record is
        staged, and before any wait what the batch staged is published and the
        workers are woken (they must see it to make room). _queue_batch stages a
        whole run at once only where this rule passes for every event of it."""
        router = self.router
        assert router is not None
        route = router.routes[worker]
        ring = router.rings[worker]
        wait_s = self._wait_s
        bound = self._max_pending
        if route.pending or (
            bound
            and route.pairs_queued - route.consumed_seen + fanout > bound
            and not self._backlog_room(worker, fanout, wait_s, batch)
        ):
            ok = False
        elif batch:
            ok = ring.stage(KIND_EVENT, eid, fanout, ts, payload)
            if not ok and wait_s:
                self._publish_and_wake(router.rings)
                ok = ring.append(KIND_EVENT, eid, fanout, ts, payload, wait_s)
                self._waited.append(ring)  # published by append: woken after the batch
            elif not ok:
                ring.note_drop()
        elif wait_s:
            ok = ring.append(KIND_EVENT, eid, fanout, ts, payload, wait_s)
        else:  # payloads are <= MAX_PAYLOAD, always under the ring's record limit
            ok = ring.try_append(KIND_EVENT, eid, fanout, ts, payload)
        if ok:
            route.pairs_queued += fanout
        else:
            route.pairs_dropped += fanout
            route.records_dropped += 1
        return ok

    def _publish_and_wake(self, rings: list[Ring]) -> None:
        """Publish every ring's staged records, cross a full barrier, wake the
        sleeping workers (inside `hot`, before a bounded wait for room)."""
        for ring in rings:
            ring.publish()
        with self._fence:
            pass
        for ring in rings:
            ring.wake_if_sleeping()

    def _backlog_room(self, worker: int, fanout: int, wait_s: float, batch: bool) -> bool:
        """Whether `worker`'s pending datagrams plus `fanout` fit under
        engine.max_pending_datagrams, with its consumed count read afresh (waiting up
        to `wait_s` for it to drain; in a batch, after publishing what it staged and
        waking the workers). An empty backlog always takes an event, however many
        subscribers it has."""
        assert self.router is not None
        if batch and wait_s:
            self._publish_and_wake(self.router.rings)
        route = self.router.routes[worker]
        region = self.regions[worker]
        deadline = time.monotonic() + wait_s
        while True:
            route.consumed_seen = region.counter(self._i_consumed)
            pending = route.pairs_queued - route.consumed_seen
            if pending <= 0 or pending + fanout <= self._max_pending:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0001)

    # -- control records ----------------------------------------------------------------
    def apply(self, change: Change) -> None:
        """A registry change as a control record for the owning worker, in order."""
        with self.hot:
            if self.router is not None:  # before start(): replayed by start()
                self.router.apply(change)

    def flush_and_fold(self) -> bool:
        """Hand pending control records over and fold what workers have read
        (tick()); True if records were handed over (wake the workers)."""
        with self.hot:
            router = self.router
            if not self.accepting or router is None:
                return False
            flushed = router.flush()
            for worker, ring in enumerate(router.rings):
                router.fold(worker, ring.read_pos)
        return bool(flushed)

    def snapshot_for(self, worker: int, read_pos: int) -> list[tuple[int, ControlPayload]]:
        """The worker's table as of ring position `read_pos` (for a restarted worker)."""
        return self.router.snapshot(worker, read_pos) if self.router is not None else []
