"""The Engine: life cycle and the public API (raise, subscribe, statistics).

`raise_event` encodes once and hands the bytes to the fan-out (engine/fanout.py),
which appends one record to the ring of every worker that holds a subscriber of
that event, never blocking on a subscriber. Subscription changes become control
records in the owning worker's ring, under the same hot lock, so "subscribe" and
"the next event" reach the worker in the order they happened. The accounting
identity is written down in engine/fanout.py, beside the counters' one writer.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from engine.address import Destination
from engine.errors import EngineError, PayloadTooLarge
from engine.fanout import DROP_REASONS, Fanout, RaiseResult
from engine.guards import Guards
from engine.options import EngineOptions
from engine.routing import member_key
from engine.shm.counters import CounterBlock
from engine.shm.ring import ControlPayload
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

__all__ = ["DROP_REASONS", "Engine", "EngineError", "RaiseResult", "Source"]

log = logging.getLogger("event_datagram.engine")


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
        # control plane; it may write the state file), `_hot` (the fan-out's) guards
        # the rings and routing. The raise path takes `_hot` only, and nothing holds
        # `_hot` while it writes a file: expiry on the raise path is the router's (in
        # memory), and the registry's sweep, which rewrites the state file, runs in
        # tick().
        self.lock = threading.RLock()
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
        self._fanout = fanout = Fanout(self.options, self._clock)
        self._hot = fanout.hot
        self._raise = fanout.raise_one  # bound once: no extra lookup per event
        self._wake_ahead = fanout.wake_ahead
        self.supervisor = Supervisor(self.options, self)
        self._next_expiry: float | None = None
        self.final_statistics: EngineStatistics | None = None
        self._sources: list[Source] = []
        self.started_at = time.time()

    # Producer-side counters, kept by the fan-out (their one writer).
    @property
    def raised(self) -> list[int]:
        return self._fanout.raised

    @property
    def oversize(self) -> list[int]:
        return self._fanout.oversize

    @property
    def events_queued(self) -> int:
        return self._fanout.events_queued

    @property
    def drops(self) -> dict[str, int]:
        return self._fanout.drops

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> Engine:
        self.supervisor.start()  # creates the segments and boots the workers (no lock:
        # the supervisor thread takes it to spawn them)
        try:
            with self.lock:
                counters = self.supervisor.counters
                assert counters is not None
                rings = self.supervisor.rings
                self._fanout.attach(rings, [counters.region(k) for k in range(len(rings))])
                self._replay_registry()  # subscriptions made before start()
                self.registry.load()  # may rewrite the state file: `_hot` is not held
                self._refresh_expiry()
                with self._hot:
                    self._fanout.accepting = True
        except BaseException:
            self.stop(0.0)  # a state file that cannot be loaded: free everything
            raise
        return self

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, let workers drain their rings (bounded), free everything."""
        with self.lock, self._hot:
            if not self._fanout.accepting and not self.supervisor.running:
                return
            self._fanout.accepting = False
            self.supervisor.stopping()  # a worker leaving at STOP must not be restarted
            self._fanout.stop_accepting(self.supervisor.rings)
        self._fanout.wake_all()
        timeout = self.options.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.supervisor.join_workers(timeout)
        with self.lock:
            self.final_statistics = self.statistics()  # the last word, before unmapping
            with self._hot:
                self._fanout.detach()
                self.supervisor.free()

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
                while not caught.wait(0.2) and self._fanout.failure is None:
                    pass
        finally:
            self.stop()
        return 1 if self._fanout.failure is not None else 0

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._fanout.accepting

    def fail(self, reason: str) -> None:
        """Called by the supervisor when workers cannot be kept alive."""
        log.error("engine stopping: %s", reason)
        self._fanout.failure = reason
        self._fanout.accepting = False

    @property
    def failure(self) -> str | None:
        return self._fanout.failure

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
        ts = self._wake_ahead(eid)  # a sleeping worker wakes while we encode
        try:
            payload = encode_notification(name, params)
        except PayloadTooLarge:
            self._fanout.count_oversize(eid)
            raise
        return self._raise(name, eid, payload, ts)

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
        ts = self._wake_ahead(eid)
        if len(payload) > MAX_PAYLOAD:
            self._fanout.count_oversize(eid)
            raise PayloadTooLarge(name, len(payload), MAX_PAYLOAD)
        return self._raise(name, eid, payload, ts)

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
        if eids:
            self._wake_ahead(eids[0])  # its workers wake while the batch is staged
        return self._fanout.raise_batch(eids, payloads)

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

    # -- control records -----------------------------------------------------------------
    def _on_change(self, change: Change) -> None:
        """Registry callback (under self.lock): tell the owning worker, in order."""
        self._fanout.apply(change)
        self._refresh_expiry()
        self._fanout.wake_all()  # a control record may be waiting for a sleeping worker

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
        return self._fanout.snapshot_for(worker, read_pos)

    def tick(self) -> None:
        """Periodic housekeeping (supervisor thread): expiry sweep, pending controls."""
        if not self._fanout.accepting:
            return
        if self._next_expiry is not None and self._clock() >= self._next_expiry:
            self.sweep()
        if self._fanout.flush_and_fold():
            self._fanout.wake_all()

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
                router = self._fanout.router
                route = router.routes[k] if router is not None else None
                assert block is not None
                # The ring first: the worker applies counters before it releases ring
                # space, so counters read after it are never older than it.
                ring_stats = ring.statistics()
                region = block.region(k)
                values = region.counters()
                scalars = region.scalars(values)
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
                        pairs_sent=scalars["pairs_sent"],
                        pairs_failed=scalars["pairs_failed"],
                        pairs_consumed=scalars["pairs_consumed"],
                        pairs_stale=scalars["pairs_stale"],
                        pairs_filtered=scalars["pairs_filtered"],
                        failovers=scalars["failovers"],
                        sleeps=ring.sleeps,
                        lost_wakeups=self.supervisor.nudges[k],
                        redelivered_pairs=scalars["redelivered_pairs"],
                        subscribers=scalars["subscribers"],
                        shared_subscribers=scalars["shared_subscribers"],
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
            block, router = self.supervisor.counters, self._fanout.router
            if block is None or router is None:
                return {}
            out: dict[str, tuple[int, int]] = {}
            for k, route in enumerate(router.routes):
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
            block, router = self.supervisor.counters, self._fanout.router
            if block is None or router is None:
                return []
            out = []
            for (eid, key), sub in router.routed.items():
                group, worker = sub.dest, router.special_owner.get(eid)
                if not isinstance(group, Group) or worker is None:
                    continue
                route, region = router.routes[worker], block.region(worker)
                slot = route.group_slots.get(f"{eid} {key}", -1)
                failovers, down = region.group_counts(slot)
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
