"""The Engine: the public raise path, its routing to worker rings, its accounting.

`raise_event` encodes once, then appends one record to the ring of every worker
that holds a subscriber of that event. It never blocks on a subscriber: a full
ring drops the record for that worker (counted), or with the "wait" policy
waits a bounded time first. Subscription changes become control records in the
owning worker's ring, under the same lock, so "subscribe" and "the next event"
reach the worker in the order they happened.

Accounting (checked by `EngineStatistics.check_identity`):
  events:  raised = oversize + dropped[no_subscribers] + dropped[ring_full] + queued
           (an event is "queued" when every target ring took it, "ring_full"
           when at least one did not)
  pairs, per worker:  queued = sent + failed + in ring
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from engine.address import Destination
from engine.errors import EngineError, PayloadTooLarge
from engine.guards import Guards
from engine.options import EngineOptions
from engine.routing import Router, member_key
from engine.shm.counters import CounterBlock, CounterLayout, Region
from engine.shm.ring import (
    KIND_EVENT,
    KIND_STOP,
    ControlPayload,
    Ring,
)
from engine.signals import SignalCatcher
from engine.statistics import (
    EngineStatistics,
    GroupStatistics,
    SourceStatistics,
    WorkerStatistics,
)
from engine.subscriptions import (
    DEFAULT_EXPIRE,
    AllowList,
    Change,
    NotAllowed,
    Registry,
    Subscriber,
    UnknownEvents,
)
from engine.supervisor import Supervisor
from engine.targets import Filter, Group, parse_target
from engine.wire import MAX_PAYLOAD, Params, encode_notification

log = logging.getLogger("event_datagram.engine")

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


class Source(Protocol):
    """What the engine asks of a source (sources/): its counters, for statistics()
    and the metrics. A source feeds events through raise_event/raise_encoded."""

    def statistics(self) -> list[SourceStatistics]: ...


class Engine:
    """The fan-out engine. Use as a context manager, or call start() and stop().

    Thread-safe: every public method may be called from any thread.
    """

    def __init__(
        self,
        options: EngineOptions | None = None,
        *,
        events: list[str] | None = None,
        allow: AllowList | None = None,
        state_file: str | None = None,
        unknown_events: UnknownEvents = "error",
        guards: Guards | None = None,
    ) -> None:
        self.options = options or EngineOptions()
        # Two locks, always taken in this order: `lock` guards the registry (the
        # control plane; it may write the state file), `_hot` guards the rings and
        # routing. The raise path takes `_hot` only, and nothing holds `_hot` while
        # it writes a file: expiry on the raise path is the router's (in memory),
        # and the registry's sweep, which rewrites the state file, runs in tick().
        self.lock = threading.RLock()
        self._hot = threading.RLock()
        # A full barrier inside `_hot` (its acquire is a locked instruction): a batch
        # that must wait for room publishes, crosses it, then wakes sleeping workers.
        self._fence = threading.Lock()
        self._waited: list[Ring] = []  # in a batch: rings that append() published
        self._event_ids: dict[str, int] = {}
        self.registry = Registry(
            allow=allow or AllowList.default(self.options.resolved_runtime_dir()),
            state_file=state_file,
            on_change=self._on_change,
            max_events=self.options.max_events,
            unknown_events=unknown_events,
            guards=guards,
        )
        # The engine's own sockets (no subscription may point at one) and the control
        # plane's refusal counters: listeners register here (engine/guards.py).
        self.guards = self.registry.guards
        self._clock = self.registry.clock  # expiry's clock: steady, in wall seconds
        for name in events or ():
            self.registry.register_event(name)
        self.supervisor = Supervisor(self.options, self)
        self._router: Router | None = None  # while running
        self._next_expiry: float | None = None
        self._accepting = False
        self._failure: str | None = None
        self.final_statistics: EngineStatistics | None = None
        self._sources: list[Source] = []
        self.started_at = time.time()
        # Producer-side counters (main process only).
        self.raised: list[int] = [0] * self.options.max_events
        self.oversize: list[int] = [0] * self.options.max_events
        self.events_queued = 0
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self._max_pending = self.options.max_pending_datagrams
        self._regions: list[Region] = []  # the workers' counter regions, while running
        self._i_consumed = CounterLayout(self.options.max_events).scalar("pairs_consumed")
        self._wait_s = (
            self.options.full_ring_wait_ms / 1000.0
            if self.options.full_ring_policy == "wait"
            else 0.0
        )

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> Engine:
        self.supervisor.start()  # creates the segments and boots the workers (no lock:
        # the supervisor thread takes it to spawn them)
        try:
            with self.lock:
                with self._hot:
                    counters = self.supervisor.counters
                    assert counters is not None
                    self._regions = [counters.region(k) for k in range(len(self.supervisor.rings))]
                    self._router = Router(self.supervisor.rings, self._regions)
                    self._router.failover_s = self.options.failover_timeout_s
                self._replay_registry()  # subscriptions made before start()
                self.registry.load()  # may rewrite the state file: `_hot` is not held
                self._refresh_expiry()
                with self._hot:
                    self._accepting = True
        except BaseException:
            self.stop(0.0)  # a state file that cannot be loaded: free everything
            raise
        return self

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, let workers drain their rings (bounded), free everything."""
        with self.lock, self._hot:
            if not self._accepting and not self.supervisor.running:
                return
            self._accepting = False
            self.supervisor.stopping()  # a worker leaving at STOP must not be restarted
            if self._router is not None:
                self._router.flush()
            for ring in self.supervisor.rings:
                ring.append(KIND_STOP, 0, 0, time.monotonic_ns(), b"", wait_s=0.5)
        self._wake_all()
        timeout = self.options.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.supervisor.join_workers(timeout)
        with self.lock:
            self.final_statistics = self.statistics()  # the last word, before unmapping
            with self._hot:
                self._regions = []
                self.supervisor.free()
                self._router = None

    def run_until_signalled(
        self,
        signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
        on_ready: Callable[[], None] | None = None,
    ) -> int:
        """Block the main thread until one of `signals` arrives or the engine fails,
        then stop (draining). `on_ready` runs once the handlers are in place.
        Returns 0 after a signal, 1 after a failure."""
        try:
            with SignalCatcher(signals) as caught:
                if on_ready is not None:
                    on_ready()
                while not caught.wait(0.2) and self._failure is None:
                    pass
        finally:
            self.stop()
        return 1 if self._failure is not None else 0

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._accepting

    def fail(self, reason: str) -> None:
        """Called by the supervisor when workers cannot be kept alive."""
        log.error("engine stopping: %s", reason)
        self._failure = reason
        self._accepting = False

    @property
    def failure(self) -> str | None:
        return self._failure

    # -- events and subscriptions ----------------------------------------------------------
    def register_event(self, name: str) -> int:
        with self.lock:
            return self.registry.register_event(name)

    def subscribe(
        self,
        event: str,
        socket: str | Destination | Group,
        expire: int | None = DEFAULT_EXPIRE,
        filter: str | list[str] | Filter | None = None,
    ) -> Change | None:
        """Subscribe a socket or a ``virtual:`` group (engine.targets), optionally
        with a filter (``name=pattern`` conditions, ANDed); see docs/routing.md."""
        if isinstance(socket, str) and expire != 0:
            socket = parse_target(socket)  # DNS happens here, outside the locks
        with self.lock:
            return self.registry.subscribe(event, socket, expire, filter)

    def unsubscribe(
        self,
        event: str,
        socket: str | Destination | Group,
        filter: str | list[str] | Filter | None = None,
    ) -> Change | None:
        with self.lock:
            return self.registry.unsubscribe(event, socket, filter)

    def own_socket(self, what: str, address: tuple[str, int] | str) -> int:
        """Register one of the engine's own listeners (as bound) and unsubscribe
        whoever now points at it (a listener opened after they subscribed: logged,
        counted). Returns how many were unsubscribed."""
        known = self.guards.own.endpoints
        endpoint = self.guards.own.add(what, address)
        if endpoint is None or endpoint in known:  # known before: nobody points at it
            return 0
        with self.lock:
            return len(self.registry.drop_own(endpoint))

    def raise_event(self, name: str, params: Params = None) -> RaiseResult:
        """Queue one event for every subscriber of `name`.

        Raises UnknownEvent; WireError for bad params; PayloadTooLarge (counted as an
        oversize rejection) for a payload over the limit; EngineError when stopped.
        """
        eid = self._event_ids.get(name)
        if eid is None:
            eid = self._learn_event(name)  # raises UnknownEvent
        try:
            payload = encode_notification(name, params)
        except PayloadTooLarge:
            with self._hot:
                self.raised[eid] += 1
                self.oversize[eid] += 1
            raise
        return self._raise(name, eid, payload)

    def raise_encoded(self, name: str, payload: bytes) -> RaiseResult:
        """Queue an event whose notification is already encoded (a source relays
        the upstream's bytes, which check_notification validated): no re-encode,
        the same size limit, counters and accounting as raise_event.

        Raises UnknownEvent; PayloadTooLarge (counted as an oversize rejection);
        EngineError when stopped.
        """
        eid = self._event_ids.get(name)
        if eid is None:
            eid = self._learn_event(name)  # raises UnknownEvent
        if len(payload) > MAX_PAYLOAD:
            with self._hot:
                self.raised[eid] += 1
                self.oversize[eid] += 1
            raise PayloadTooLarge(name, len(payload), MAX_PAYLOAD)
        return self._raise(name, eid, payload)

    def event_id(self, name: str) -> int:
        """The id of event `name`, for raise_encoded_batch. Raises UnknownEvent."""
        eid = self._event_ids.get(name)
        return self._learn_event(name) if eid is None else eid

    def raise_encoded_batch(self, eids: Sequence[int], payloads: Sequence[bytes]) -> int:
        """Queue a batch of already-encoded events in order: payloads[i] is a
        notification of the event with id eids[i] (event_id()). Each event is routed,
        limited and counted exactly as raise_encoded would, at a batch's cost: `_hot`
        taken once, the clock read and expiry checked once, each worker's records
        written and published (one move of its ring's write position) once, its
        worker woken (if asleep) once, after the lock's release. Control records still
        come first: a worker with control records waiting takes no event.

        A payload over MAX_PAYLOAD is counted as an oversize event (raised and
        oversize, as raise_encoded counts it) and not queued. Returns how many were.
        Raises EngineError when stopped, before anything of the batch is counted.
        """
        with self._hot:
            if not self._accepting:
                raise EngineError(self._failure or "engine is not running")
            oversize, touched = self._queue_batch(eids, payloads)
        # Releasing the lock was the barrier (see _raise).
        try:
            for ring in touched:
                ring.wake_if_sleeping()
        except ValueError:  # stop() unmapped the rings meanwhile: no one to wake
            pass
        return oversize

    def _raise(self, name: str, eid: int, payload: bytes) -> RaiseResult:
        with self._hot:
            if not self._accepting:
                raise EngineError(self._failure or "engine is not running")
            result = self._queue(name, eid, payload)
        # Releasing the lock was a full barrier (a locked instruction), so a worker
        # that went to sleep before our append is seen asleep now (shm/ring.py).
        if result.workers_queued:
            self._wake(eid)
        return result

    def _wake(self, eid: int) -> None:
        """Wake the sleeping workers that hold subscribers of `eid` (no system call
        for a worker that is awake)."""
        router = self._router
        if router is None:
            return
        rings = router.rings
        try:
            for worker, _ in router.targets.get(eid, ()):
                rings[worker].wake_if_sleeping()
        except ValueError:  # stop() unmapped the rings meanwhile: no one to wake
            pass

    def _wake_all(self) -> None:
        """After control records (outside `_hot`: its release is the barrier)."""
        router = self._router
        if router is None:
            return
        with contextlib.suppress(ValueError):  # unmapped by stop() meanwhile
            for ring in router.rings:
                ring.wake_if_sleeping()

    def _learn_event(self, name: str) -> int:
        # No lock: a dict read is atomic, and ids never change once given (taking
        # `lock` here could wait behind a state-file write).
        eid = self.registry.event_id(name)
        self._event_ids[name] = eid
        return eid

    def sweep(self) -> None:
        """Remove expired subscribers now (their workers are told in order)."""
        with self.lock:
            self.registry.sweep()
            self._refresh_expiry()

    def _queue(self, name: str, eid: int, payload: bytes) -> RaiseResult:
        self.raised[eid] += 1
        router = self._router
        if router is not None and router.next_expiry <= (now := self._clock()):
            router.expire(now)  # an expired subscriber receives nothing more
        targets = router.targets.get(eid) if router is not None else None
        if not targets or router is None:
            self.drops["no_subscribers"] += 1
            return RaiseResult(name, len(payload), 0, 0, 0)
        rings = router.rings
        routes = router.routes
        ts = time.monotonic_ns()
        wait_s = self._wait_s
        queued = dropped = pairs = 0
        bound = self._max_pending
        for worker, fanout in targets:
            route = routes[worker]
            if route.pending:  # control records first: the event must not overtake them
                ok = False
            elif (
                bound
                and route.pairs_queued - route.consumed_seen + fanout > bound
                and not self._backlog_room(worker, fanout, wait_s)
            ):
                ok = False  # a backlog of datagrams, not only of bytes, is bounded
            elif wait_s:
                ok = rings[worker].append(KIND_EVENT, eid, fanout, ts, payload, wait_s)
            else:  # payloads are <= MAX_PAYLOAD, always under the ring's record limit
                ok = rings[worker].try_append(KIND_EVENT, eid, fanout, ts, payload)
            if ok:
                queued += 1
                pairs += fanout
                route.pairs_queued += fanout
            else:
                dropped += 1
                route.pairs_dropped += fanout
                route.records_dropped += 1
        if dropped:
            self.drops["ring_full"] += 1
        else:
            self.events_queued += 1
        return RaiseResult(name, len(payload), queued, dropped, pairs)

    def _queue_batch(
        self, eids: Sequence[int], payloads: Sequence[bytes]
    ) -> tuple[int, list[Ring]]:
        """_queue for a batch (under `_hot`), a run of events of one id at a time:
        per target worker, the run's records are staged with one Ring.stage_many;
        whatever that does not take (a full ring, the ring's end, a backlog near
        engine.max_pending_datagrams, an oversize payload) goes one event at a
        time through _stage_one, which decides exactly as _queue does. Returns
        (oversize, the rings whose write position moved, to wake)."""
        router = self._router
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
                    if e not in big and not self._stage_one(worker, eid, fanout, ts, payloads[e]):
                        if failed is None:
                            failed = set()
                        failed.add(e)
            full = len(failed) if failed else 0
            ring_full += full
            queued += m - len(big) - full
        touched = [ring for ring in rings if ring.publish()]
        if self._waited:  # published while waiting for room (see _stage_one)
            touched.extend(r for r in self._waited if r not in touched)
        self.events_queued += queued
        drops = self.drops
        drops["ring_full"] += ring_full
        drops["no_subscribers"] += no_subscribers
        return oversize, touched

    def _stage_one(self, worker: int, eid: int, fanout: int, ts: int, payload: bytes) -> bool:
        """One record of a batch for one worker, decided exactly as _queue decides
        (control records first, the backlog bound, the full-ring policy) and
        counted in its route; True if the ring took it."""
        assert self._router is not None
        rings = self._router.rings
        route = self._router.routes[worker]
        ring = rings[worker]
        wait_s = self._wait_s
        bound = self._max_pending
        if route.pending:  # control records first: the event must not overtake them
            ok = False
        elif (
            bound
            and route.pairs_queued - route.consumed_seen + fanout > bound
            and not self._backlog_room_in_batch(worker, fanout, wait_s)
        ):
            ok = False  # a backlog of datagrams, not only of bytes, is bounded
        elif ring.stage(KIND_EVENT, eid, fanout, ts, payload):
            ok = True
        elif wait_s:  # the worker must see what is staged to make room for it
            self._publish_and_wake(rings)
            ok = ring.append(KIND_EVENT, eid, fanout, ts, payload, wait_s)
            self._waited.append(ring)  # published by append: woken after the batch
        else:
            ring.note_drop()
            ok = False
        if ok:
            route.pairs_queued += fanout
        else:
            route.pairs_dropped += fanout
            route.records_dropped += 1
        return ok

    def _backlog_room_in_batch(self, worker: int, fanout: int, wait_s: float) -> bool:
        """_backlog_room inside a batch: before it may wait for the worker to drain,
        what the batch staged is published and sleeping workers are woken."""
        if wait_s:
            assert self._router is not None
            self._publish_and_wake(self._router.rings)
        return self._backlog_room(worker, fanout, wait_s)

    def _publish_and_wake(self, rings: list[Ring]) -> None:
        """Publish every ring's staged records, cross a full barrier, wake the
        sleeping workers (inside `_hot`, before a bounded wait for room)."""
        for ring in rings:
            ring.publish()
        with self._fence:
            pass
        for ring in rings:
            ring.wake_if_sleeping()

    def _backlog_room(self, worker: int, fanout: int, wait_s: float) -> bool:
        """Whether `worker`'s pending datagrams plus `fanout` fit under
        engine.max_pending_datagrams, with its consumed count read afresh (waiting up
        to `wait_s` for it to drain). An empty backlog always takes an event, however
        many subscribers it has."""
        assert self._router is not None
        route = self._router.routes[worker]
        region = self._regions[worker]
        deadline = time.monotonic() + wait_s
        while True:
            route.consumed_seen = region.counter(self._i_consumed)
            pending = route.pairs_queued - route.consumed_seen
            if pending <= 0 or pending + fanout <= self._max_pending:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0001)

    # -- control records -----------------------------------------------------------------
    def _on_change(self, change: Change) -> None:
        """Registry callback (under self.lock): tell the owning worker, in order."""
        with self._hot:
            if self._router is not None:  # before start(): replayed by start()
                self._router.apply(change)
            self._refresh_expiry()
        self._wake_all()  # a control record may be waiting for a sleeping worker

    def _replay_registry(self) -> None:
        for name, eid in self.registry.events():
            for sub in reversed(self.registry.subscribers(name)):  # oldest first
                self._on_change(Change("added", name, eid, sub))

    def _refresh_expiry(self) -> None:
        self._next_expiry = self.registry.next_expiry()

    # -- supervisor hooks (called with `hot_lock()` held) -------------------------------------
    def hot_lock(self) -> threading.RLock:
        """The lock of the raise path: the supervisor holds it to restart a worker."""
        return self._hot

    def snapshot_for(self, worker: int, read_pos: int) -> list[tuple[int, ControlPayload]]:
        """The worker's table as of ring position `read_pos` (for a restarted worker)."""
        return self._router.snapshot(worker, read_pos) if self._router is not None else []

    def tick(self) -> None:
        """Periodic housekeeping (supervisor thread): expiry sweep, pending controls."""
        if not self._accepting:
            return
        if self._next_expiry is not None and self._clock() >= self._next_expiry:
            self.sweep()
        with self._hot:
            router = self._router
            if not self._accepting or router is None:
                return
            flushed = router.flush()
            for worker, ring in enumerate(router.rings):
                router.fold(worker, ring.read_pos)
        if flushed:
            self._wake_all()

    # -- statistics --------------------------------------------------------------------------
    def statistics(self) -> EngineStatistics:
        """A consistent snapshot of every counter (taken under both locks)."""
        # The sources first, outside both locks: a source holds its own lock while it
        # raises (which takes `_hot`), so taking its lock under ours would deadlock.
        sources = tuple(s for source in list(self._sources) for s in source.statistics())
        with self.lock, self._hot:
            if not self.supervisor.running and self.final_statistics is not None:
                return self.final_statistics  # stopped: the segments are gone
            workers = []
            block: CounterBlock | None = self.supervisor.counters
            for k, ring in enumerate(self.supervisor.rings):
                route = self._router.routes[k] if self._router is not None else None
                assert block is not None
                # The ring first: the worker applies counters before it releases ring
                # space, so counters read after it are never older than it.
                ring_stats = ring.statistics()
                region = block.region(k)
                values = region.counters()
                lay = block.layout
                failures = region.failures(values)
                workers.append(
                    WorkerStatistics(
                        index=k,
                        pid=self.supervisor.pid_of(k),
                        alive=self.supervisor.alive(k),
                        restarts=self.supervisor.restarts[k],
                        ring=ring_stats,
                        pairs_queued=route.pairs_queued if route else 0,
                        pairs_dropped=route.pairs_dropped if route else 0,
                        records_dropped=route.records_dropped if route else 0,
                        pairs_sent=values[lay.scalar("pairs_sent")],
                        pairs_failed=values[lay.scalar("pairs_failed")],
                        pairs_consumed=values[lay.scalar("pairs_consumed")],
                        pairs_stale=values[lay.scalar("pairs_stale")],
                        pairs_filtered=values[lay.scalar("pairs_filtered")],
                        failovers=values[lay.scalar("failovers")],
                        sleeps=ring.sleeps,
                        redelivered_pairs=values[lay.scalar("redelivered_pairs")],
                        subscribers=values[lay.scalar("subscribers")],
                        shared_subscribers=values[lay.scalar("shared_subscribers")],
                        failures=failures,
                        counters=tuple(values),
                    )
                )
            names = dict((eid, name) for name, eid in self.registry.events())
            return EngineStatistics(
                events_raised={names[e]: self.raised[e] for e in names},
                events_oversize={names[e]: self.oversize[e] for e in names},
                events_queued=self.events_queued,
                drops=dict(self.drops),
                workers=tuple(workers),
                event_names=names,
                max_events=self.options.max_events,
                sources=sources,
            )

    def subscriber_counts(self) -> dict[str, tuple[int, int]]:
        """Datagrams sent and sends failed, per live subscriber key (all its events)."""
        with self._hot:
            block = self.supervisor.counters
            if block is None or self._router is None:
                return {}
            out: dict[str, tuple[int, int]] = {}
            for k, route in enumerate(self._router.routes):
                region = block.region(k)
                for key in route.keys:
                    slot = route.slots.get(key, -1)
                    if slot >= 0:
                        out[key] = region.subscriber_counts(slot)
            return out

    def group_statistics(self) -> list[GroupStatistics]:
        """Every live ``virtual:`` group: its failovers, members down (as of its last
        event) and datagrams sent per member (docs/routing.md)."""
        with self._hot:
            block, router = self.supervisor.counters, self._router
            if block is None or router is None:
                return []
            out = []
            for (eid, key), sub in router.routed.items():
                group, worker = sub.dest, router.special_owner.get(eid)
                if not isinstance(group, Group) or worker is None:
                    continue
                route, region = router.routes[worker], block.region(worker)
                slot = route.group_slots.get(f"{eid} {key}", -1)
                lay = region.layout
                failovers = region.counter(lay.group(slot, 0)) if slot >= 0 else 0
                down = region.counter(lay.group(slot, 1)) if slot >= 0 else 0
                members = []
                for m in group.members:
                    mslot = route.slots.get(member_key(key, m), -1)
                    sent = region.subscriber_counts(mslot)[0] if mslot >= 0 else 0
                    members.append((m.key, sent))
                name = self.registry.event_name(eid)
                out.append(GroupStatistics(name, group.key, failovers, down, members))
            return out

    def add_source(self, source: Source) -> None:
        """Count `source` in statistics() (and so in /metrics and the identity)."""
        with self.lock:
            self._sources.append(source)

    def remove_source(self, source: Source) -> None:
        """Stop counting `source` (stopped by a config reload)."""
        with self.lock, contextlib.suppress(ValueError):
            self._sources.remove(source)

    def set_allow(self, allow: AllowList) -> list[tuple[str, str]]:
        """Check subscriptions against `allow` from now on, and remove the ones it
        refuses (a reload that narrows the allow-list). Returns them (event, socket)."""
        refused: list[tuple[str, Subscriber]] = []
        with self.lock:
            self.registry.allow = allow
            for name, _eid in self.registry.events():
                for sub in self.registry.subscribers(name):
                    members = sub.dest.members if isinstance(sub.dest, Group) else (sub.dest,)
                    try:
                        for member in members:  # a group is refused whole, as at subscribe
                            allow.check(member)
                    except NotAllowed:
                        refused.append((name, sub))
            for name, sub in refused:
                self.unsubscribe(name, sub.dest, sub.filter)
        return [(name, sub.key) for name, sub in refused]

    def describe(self) -> dict[str, Any]:
        """Where the engine runs, for logs and the `run` command's ready line."""
        return {
            "instance": self.options.instance,
            "workers": len(self.supervisor.rings),
            "cpus": self.supervisor.cpus,
        }
