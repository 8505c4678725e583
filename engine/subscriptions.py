"""Events and their subscribers: expiry, the allow-list, persistence, change feed.

Why this is long: the registry's invariants (ids, expiry, allow-list, the
change feed, the state journal's order) are kept under one lock by one class.

The OpenSIPS Event Interface semantics (SPEC section 3; MEASUREMENTS 5 and 6):

- Events are known by name and get dense ids 0, 1, 2... in registration order.
- ``subscribe(event, socket, expire=3600)``: ``expire`` 0 unsubscribes at once
  (OpenSIPS waits for the next clock second), a negative one is an error, and
  ``None`` means "never expires" (a static subscription from the config).
  Subscribing the same socket again (same printed key) refreshes its time and
  expire in place: no duplicate, same list position. Lists are newest first.
- ``ttl = expire - whole seconds elapsed``; a subscriber is expired once
  ``now >= subscribed_at + expire`` and is removed by ``sweep()``, which
  subscribing, unsubscribing, listing and searching run first. Expiry instants
  are kept in a heap, so a sweep costs nothing when nothing is due and
  O(log n) per expired subscriber otherwise; ``next_expiry()`` lets a hot path
  skip sweeping with one float compare.
- Beyond OpenSIPS: an allow-list checked at subscribe time, and expiring
  subscriptions persisted to a state file (see engine/state.py): each change is
  one fsynced journal line before it is answered, so subscribing, refreshing
  and unsubscribing cost O(1) amortised (plus the heap's O(log n)) however
  many subscribers there are; only listing is O(n), in what it returns.

Every added/removed/refreshed subscriber is reported, in order, to ``on_change``
(the engine turns these into control records for its workers); it must not
raise. A method that raises leaves the live subscriptions unchanged (the sweep
it ran first may have removed expired ones).
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from engine.address import AddressError, Destination
from engine.errors import (
    BadExpire,
    NotAllowed,
    SelfSubscription,
    StateFileError,
    SubscriptionError,
    UnknownEvent,
)
from engine.guards import Endpoint, Guards, reason
from engine.state import MAX_EXPIRE, DelRecord, Record, SetRecord, StateEntry, StateStore
from engine.targets import Filter, Group, parse_filter, parse_target, subscription_key
from engine.wire import check_event_name

__all__ = [
    "DEFAULT_EXPIRE",
    "AllowList",
    "BadExpire",
    "Change",
    "NotAllowed",
    "Registry",
    "StateFileError",
    "Subscriber",
    "SubscriptionError",
    "UnknownEvent",
]

log = logging.getLogger(__name__)

DEFAULT_EXPIRE: Final = 3600

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AllowList:
    """Destinations a subscriber may name: UDP networks and UNIX directory prefixes."""

    networks: tuple[IPNetwork, ...]
    unix_prefixes: tuple[str, ...]

    @classmethod
    def default(cls, runtime_dir: str | None = None) -> AllowList:
        """Loopback (127.0.0.0/8, ::1), /tmp/ and the engine's runtime directory."""
        items = ["127.0.0.0/8", "::1/128", "/tmp/"]
        return cls.parse(items if runtime_dir is None else [*items, runtime_dir])

    @classmethod
    def parse(cls, items: Iterable[str]) -> AllowList:
        """Parse networks ("10.0.0.0/8", "::1") and directories ("unix:/run/app/", "/run/app").

        A directory always ends up with a trailing "/", so "/run/app" does not
        admit "/run/apple". Raises ValueError naming the bad item.
        """
        networks: dict[IPNetwork, None] = {}
        prefixes: dict[str, None] = {}
        for item in items:
            if not isinstance(item, str) or not item:
                raise ValueError(f"allow-list item {item!r}: expected a network or a directory")
            path = item.removeprefix("unix:")
            if path.startswith("/"):
                # As written and as resolved: destinations are judged by their real
                # path, so a prefix that is itself a symbolic link still admits them.
                for form in (os.path.normpath(path), os.path.realpath(path)):
                    prefixes[form if form.endswith("/") else form + "/"] = None
            elif path != item:
                raise ValueError(f"allow-list item {item!r}: a UNIX prefix must be absolute")
            else:
                try:
                    networks[ipaddress.ip_network(item)] = None
                except ValueError as exc:
                    raise ValueError(f"allow-list item {item!r}: {exc}") from None
        return cls(tuple(networks), tuple(prefixes))

    def check(self, dest: Destination) -> None:
        """Raise NotAllowed unless the resolved address or real path is allowed (a
        UNIX path with its symbolic links resolved: SubscriptionError for a dangling one)."""
        if dest.transport == "unix":
            real = dest.sockaddr if isinstance(dest.sockaddr, str) else dest.path
            path = os.path.normpath(real)
            if not path.startswith(self.unix_prefixes):
                raise NotAllowed(dest.key, self, "" if path == dest.path else f" (= {path})")
            if os.path.islink(dest.path) and not os.path.exists(dest.path):
                raise SubscriptionError(
                    f"destination {dest.key} is a dangling symbolic link (to {real})"
                )
            return
        try:
            ip = ipaddress.ip_address(dest.sockaddr[0])
        except ValueError:
            raise NotAllowed(dest.key, self, " (not resolved)") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in net for net in self.networks):
            raise NotAllowed(dest.key, self, "" if str(ip) == dest.host else f" (= {ip})")

    def __str__(self) -> str:
        parts = [str(n) for n in self.networks] + [f"unix:{p}" for p in self.unix_prefixes]
        return ", ".join(parts) or "empty"


@dataclass(frozen=True, slots=True)
class Subscriber:
    dest: Destination | Group
    expire: int | None  # None = never expires (static, from config)
    subscribed_at: float  # the registry's wall clock
    filter: Filter | None = None  # engine.targets: only the events it matches

    @property
    def key(self) -> str:
        """The identity within its event (engine.targets.subscription_key)."""
        return subscription_key(self.dest, self.filter)

    @property
    def filter_text(self) -> str:
        return "" if self.filter is None else self.filter.text

    def ttl(self, now: float) -> int | None:
        """Seconds left as OpenSIPS shows them (may be <= 0); None for never."""
        if self.expire is None:
            return None
        return self.expire - max(0, int(now - self.subscribed_at))

    @property
    def expires_at(self) -> float | None:
        """The expiry instant on the registry's clock; None for never."""
        return None if self.expire is None else self.subscribed_at + self.expire

    def expired(self, now: float) -> bool:
        return self.expire is not None and now >= self.subscribed_at + self.expire


_Subs = dict[str, Subscriber]  # one event's subscribers by key, OLDEST first


@dataclass(frozen=True, slots=True)
class Change:
    kind: Literal["added", "removed", "refreshed"]
    event: str
    event_id: int
    subscriber: Subscriber


def _check_expire(expire: object) -> None:
    if expire is None:
        return
    if not isinstance(expire, int) or isinstance(expire, bool) or not 0 <= expire <= MAX_EXPIRE:
        raise BadExpire(expire, MAX_EXPIRE)


def steady_clock() -> Callable[[], float]:
    """A wall clock that never jumps: the wall time of its creation plus monotonic
    time since. Expiry follows it, so stepping the system clock back (or forward)
    while the engine runs neither keeps a subscription alive nor ends it early;
    the instants it gives are still wall-clock seconds, as the state file keeps."""
    wall0, mono0 = time.time(), time.monotonic()
    return lambda: wall0 + (time.monotonic() - mono0)


UnknownEvents = Literal["error", "register", "drop"]


class Registry:
    """Not thread-safe: the engine serialises calls with its own lock.

    `unknown_events` says what `load()` does with saved subscriptions to events
    that are not registered: "error" (refuse, naming them), "register" them, or
    "drop" them (logged).
    """

    def __init__(
        self,
        *,
        allow: AllowList | None = None,
        state_file: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] | None = None,
        on_change: Callable[[Change], None] | None = None,
        max_events: int = 256,
        unknown_events: UnknownEvents = "error",
        guards: Guards | None = None,
    ) -> None:
        self._allow = AllowList.default() if allow is None else allow
        # The engine's own sockets: no subscriber may point at one (it would loop).
        self.guards = Guards() if guards is None else guards
        self._store = None if state_file is None else StateStore(os.fspath(state_file))
        self.clock = self._clock = clock or steady_clock()
        self._unknown_events = unknown_events
        # Saved entries that could not be restored now (a destination that no longer
        # resolves or is no longer allowed): kept in the file until they expire, or
        # until the same event and socket is subscribed again. By (event, socket).
        self._carried: dict[tuple[str, str], StateEntry] = {}
        self._on_change = on_change
        self._max_events = max_events
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._subs: list[_Subs] = []  # per event id
        self._heap: list[tuple[float, int, str]] = []  # (expiry instant, event id, key), lazy
        self._heap_limit = 64
        self._expiring = 0  # subscribers with an expiry: the ones in the state file

    @property
    def allow(self) -> AllowList:
        return self._allow

    @allow.setter
    def allow(self, allow: AllowList) -> None:
        """Check subscriptions made from now on against `allow` (a config reload)."""
        self._allow = allow

    def register_event(self, name: str) -> int:
        """Return the event's id, registering it first if needed."""
        eid = self._ids.get(name) if isinstance(name, str) else None
        if eid is not None:
            return eid
        check_event_name(name)
        if len(self._names) >= self._max_events:
            raise SubscriptionError(
                f"cannot register event {name!r}: {self._max_events} is the limit"
            )
        self._ids[name] = eid = len(self._names)
        self._names.append(name)
        self._subs.append({})
        return eid

    def event_id(self, name: str) -> int:
        eid = self._ids.get(name) if isinstance(name, str) else None
        if eid is None:
            raise UnknownEvent(name)
        return eid

    def event_name(self, event_id: int) -> str:
        if not isinstance(event_id, int) or not 0 <= event_id < len(self._names):
            raise UnknownEvent(event_id)
        return self._names[event_id]

    def events(self) -> list[tuple[str, int]]:
        return [(name, eid) for eid, name in enumerate(self._names)]

    def subscribe(
        self,
        event: str,
        socket: str | Destination | Group,
        expire: int | None = DEFAULT_EXPIRE,
        filter: str | list[str] | Filter | None = None,
    ) -> Change | None:
        """Add or refresh a subscriber; expire 0 unsubscribes, None never expires.

        `socket` may be a ``virtual:`` group (engine.targets): every member goes
        through the same checks as a plain socket. `filter` (``name=pattern``
        conditions) is part of the subscription's identity.

        O(1) amortised (the expiry heap: O(log n)); with a state file, the change is
        durable (fsynced) before this returns, or it raises and is not made."""
        _check_expire(expire)
        eid = self.event_id(event)
        filt = filter if isinstance(filter, Filter) else parse_filter(filter)
        if expire == 0:
            return self.unsubscribe(event, socket, filt)
        dest = socket if isinstance(socket, (Destination, Group)) else parse_target(_text(socket))
        self._check_dest(dest, "subscribe")
        now = self._clock()
        self._sweep(now)  # an expired subscriber of this socket is gone: this one is new
        new = Subscriber(dest, expire, now, filt)
        subs, name, key = self._subs[eid], self._names[eid], new.key
        old = subs.get(key)
        if old is not None and isinstance(old.dest, Group):
            new = Subscriber(old.dest, expire, now, filt)  # PARALLEL: listed as first given
        subs[key] = new
        socket_text, ftext = new.dest.key, new.filter_text
        was_saved = old is not None and old.expire is not None
        if expire is not None or was_saved:
            carried = self._carried.pop((name, key), None)
            self._expiring += (expire is not None) - was_saved
            record: Record = (
                DelRecord(name, socket_text, ftext)
                if expire is None
                else SetRecord(name, socket_text, expire, now, ftext)
            )
            try:
                # A static subscriber that becomes expiring keeps its place in the list,
                # which an appended line cannot say: a snapshot says it (rare: config
                # subscriptions are static, and the MI cannot make one static again).
                self._persist([record], compact=old is not None and old.expire is None)
            except BaseException:
                self._expiring -= (expire is not None) - was_saved
                if old is None:
                    del subs[key]
                else:
                    subs[key] = old  # in place: the list keeps its order
                if carried is not None:
                    self._carried[(name, key)] = carried
                raise
        if expire is not None:
            self._push(now + expire, eid, key)
        change = Change("added" if old is None else "refreshed", name, eid, new)
        self._emit(change)
        return change

    def _check_dest(self, dest: Destination | Group, origin: str) -> None:
        """The guard and the allow-list, for a socket or every member of a group."""
        members = _members(dest)
        try:  # first: a loop is named as one, even when the allow-list refuses it too
            for member in members:
                self.guards.own.check(member)
        except SelfSubscription:
            self.guards.count_self_refused(origin)
            raise
        for member in members:
            self._allow.check(member)

    def unsubscribe(
        self,
        event: str,
        socket: str | Destination | Group,
        filter: str | list[str] | Filter | None = None,
    ) -> Change | None:
        """Remove a subscriber; None when it was not subscribed. O(1) amortised;
        durable before it returns, like subscribe()."""
        eid = self.event_id(event)
        key = _key(socket, filter)
        self._sweep(self._clock())
        subs, name = self._subs[eid], self._names[eid]
        old = subs.get(key)
        if old is None:
            return None
        if old.expire is not None:  # written first: a failure leaves the list as it was
            record = DelRecord(name, old.dest.key, old.filter_text)
            self._persist([record], removing=(eid, key))
            self._expiring -= 1
        del subs[key]
        change = Change("removed", name, eid, old)
        self._emit(change)
        return change

    def subscribers(self, event: str) -> list[Subscriber]:
        """The event's live subscribers, newest first (expired ones are removed first)."""
        eid = self.event_id(event)
        self.sweep()
        return list(reversed(self._subs[eid].values()))

    def find(
        self,
        event: str,
        socket: str | Destination | Group,
        filter: str | list[str] | Filter | None = None,
    ) -> Subscriber | None:
        """The live subscriber with exactly this key; None also for an unparsable socket."""
        eid = self.event_id(event)
        try:
            key = _key(socket, filter)
        except ValueError:
            return None
        self.sweep()
        return self._subs[eid].get(key)

    def sweep(self) -> list[Change]:
        """Remove every expired subscriber; return (and report) the removals."""
        return self._sweep(self._clock())

    def _sweep(self, now: float) -> list[Change]:
        heap = self._heap
        if not heap or heap[0][0] > now:
            return []
        changes = []
        while heap and heap[0][0] <= now:
            _, eid, key = heapq.heappop(heap)
            sub = self._subs[eid].get(key)
            if sub is not None and sub.expired(now):
                del self._subs[eid][key]
                changes.append(Change("removed", self._names[eid], eid, sub))
        if changes:
            self._expiring -= len(changes)
            if self._store is not None:  # best effort: a reload drops expired ones anyway
                records = [
                    DelRecord(c.event, c.subscriber.dest.key, c.subscriber.filter_text)
                    for c in changes
                ]
                self._store.commit_quietly(records, self._entries, self._live())
            for change in changes:
                self._emit(change)
        return changes

    def next_expiry(self) -> float | None:
        """The earliest expiry instant among expiring subscribers, None if there are none."""
        heap = self._heap
        while heap:
            instant, eid, key = heap[0]
            sub = self._subs[eid].get(key)
            if sub is not None and sub.expires_at == instant:
                return instant
            heapq.heappop(heap)
        return None

    def load(self) -> int:
        """Restore the state file's live subscriptions; return how many were restored.

        Nothing saved is lost silently: a subscription to an event that is not
        registered follows `unknown_events`; one whose destination cannot be
        restored now (no longer resolves, no longer allowed) is logged and kept in
        the file until it expires; one saved with a `subscribed_at` in the future
        (a clock that ran ahead) counts from now.

        Raises StateFileError (and refuses to save from then on) for a corrupt
        file; StateFileError naming the events for unknown ones with "error", or
        naming engine.max_events when their events do not fit.
        """
        state = None if self._store is None else self._store.read()
        if self._store is None or state is None:
            return 0
        entries = state.entries
        path, now = self._store.path, self._clock()
        live, changes = [], []
        for entry in entries:
            if entry.subscribed_at > now:
                log.warning(
                    "state file %s: %s %s was subscribed %.0f s in the future; counted from now",
                    path, entry.event, entry.socket, entry.subscribed_at - now,
                )  # fmt: skip
                entry = msgspec.structs.replace(entry, subscribed_at=now)
            if now < entry.subscribed_at + entry.expire:
                live.append(entry)
        live = self._known_events(path, live)
        for entry in live:
            try:
                dest = parse_target(entry.socket)
                filt = parse_filter(entry.filter or None)
                for member in _members(dest):
                    self.guards.own.check(member)
                    self._allow.check(member)
            except SelfSubscription as exc:  # a saved loop: never resumed, dropped
                log.warning(
                    "state file %s: dropped %s %s: %s", path, entry.event, entry.socket, exc
                )
                self.guards.count_self_refused("state")
                continue
            except (ValueError, OSError, SubscriptionError) as exc:
                log.warning(
                    "state file %s: cannot restore %s %s now (%s); kept in the file until "
                    "it expires", path, entry.event, entry.socket, exc,
                )  # fmt: skip
                self._carried[(entry.event, _entry_key(entry))] = entry
                continue
            eid = self.register_event(entry.event)
            subs = self._subs[eid]
            sub = Subscriber(dest, entry.expire, entry.subscribed_at, filt)
            old = subs.get(sub.key)
            subs[sub.key] = sub
            self._push(entry.subscribed_at + entry.expire, eid, sub.key)
            kind: Literal["added", "refreshed"] = "added" if old is None else "refreshed"
            changes.append(Change(kind, entry.event, eid, sub))
        self._expiring = sum(s.expire is not None for subs in self._subs for s in subs.values())
        if not state.compact or self._entries() != entries:  # compacted, tidied
            self._store.write_quietly(self._entries())
        for change in changes:
            self._emit(change)
        return len(changes)

    def _known_events(self, path: str, entries: list[StateEntry]) -> list[StateEntry]:
        """Apply `unknown_events` to saved subscriptions of unregistered events, and
        check that the events they need fit in max_events."""
        counts: dict[str, int] = {}
        for entry in entries:
            if entry.event not in self._ids:
                counts[entry.event] = counts.get(entry.event, 0) + 1
        if not counts:
            return entries
        names = sorted(counts.items())
        listed = ", ".join(f"{name} ({n})" for name, n in names[:10])
        if len(names) > 10:
            listed += f" and {len(names) - 10} more"
        if self._unknown_events == "error":
            raise StateFileError(
                path,
                f"holds subscriptions to events the config does not name: {listed}; add "
                f'them to `events`, or set state.unknown_events = "register" (keep them) '
                f'or "drop" (forget them)',
            )
        if self._unknown_events == "drop":
            log.warning("state file %s: dropped subscriptions to unknown events: %s", path, listed)
            return [e for e in entries if e.event in self._ids]
        room = self._max_events - len(self._names)
        if len(counts) > room:
            raise StateFileError(
                path,
                f"needs {len(counts)} more event(s) ({listed}) but engine.max_events = "
                f"{self._max_events} leaves room for {room}: raise engine.max_events to at "
                f"least {len(self._names) + len(counts)}",
            )
        log.warning("state file %s: registered events it names: %s", path, listed)
        return entries

    def drop_own(self, endpoint: Endpoint) -> list[Change]:
        """Unsubscribe every subscriber that points at `endpoint`, one of the engine's
        own sockets opened after it subscribed; logged and counted. O(n)."""
        among = [endpoint]
        doomed = [
            (name, sub, member)
            for eid, name in enumerate(self._names)
            for sub in self._subs[eid].values()
            for member in _members(sub.dest)
            if self.guards.own.match(member, among) is not None
        ]
        changes = []
        for name, sub, member in doomed:
            log.warning("unsubscribed %s %s: %s", name, sub.key, reason(member, endpoint))
            change = self.unsubscribe(name, sub.dest, sub.filter)
            if change is not None:
                self.guards.count_self_refused("listener")
                changes.append(change)
        return changes

    def save(self) -> None:
        """Write every expiring subscription to the state file, atomically (a snapshot:
        the journal starts empty)."""
        if self._store is not None:
            self._store.write(self._entries())

    def _persist(
        self,
        records: list[Record],
        *,
        removing: tuple[int, str] | None = None,
        compact: bool = False,
    ) -> None:
        """Make `records` durable (the registry already shows them, except the
        subscriber `removing`, still in its list). Raises StateFileError."""
        if self._store is not None:
            live = self._live() - (removing is not None)
            self._store.commit(records, lambda: self._entries(removing), live, compact=compact)

    def _live(self) -> int:
        """How many entries a snapshot would hold (carried ones may have expired)."""
        return self._expiring + len(self._carried)

    def _emit(self, change: Change) -> None:
        if self._on_change is not None:
            self._on_change(change)

    def _push(self, instant: float, eid: int, key: str) -> None:
        heapq.heappush(self._heap, (instant, eid, key))
        if len(self._heap) > self._heap_limit:  # drop stale entries, amortised O(1)
            self._heap = [
                (s.subscribed_at + s.expire, e, k)
                for e, subs in enumerate(self._subs)
                for k, s in subs.items()
                if s.expire is not None
            ]
            heapq.heapify(self._heap)
            self._heap_limit = max(64, 2 * len(self._heap))

    def _entries(self, without: tuple[int, str] | None = None) -> list[StateEntry]:
        """The state file's entries: every expiring subscriber (but `without`), in
        list order per event, then the carried ones. O(n): for snapshots only."""
        now = self._clock()
        self._carried = {k: c for k, c in self._carried.items() if now < c.subscribed_at + c.expire}
        return [
            StateEntry(self._names[eid], s.dest.key, s.expire, s.subscribed_at, s.filter_text)
            for eid, subs in enumerate(self._subs)
            for key, s in subs.items()
            if s.expire is not None and (eid, key) != without
        ] + list(self._carried.values())


def _text(socket: object) -> str:
    if not isinstance(socket, str):
        raise AddressError(f"socket {socket!r}: expected a string")
    return socket


def _key(socket: str | Destination | Group, filt: str | list[str] | Filter | None = None) -> str:
    target = socket if not isinstance(socket, str) else parse_target(socket, resolve=False)
    if not isinstance(target, (Destination, Group)):
        raise AddressError(f"socket {socket!r}: expected a string")
    return subscription_key(target, filt if isinstance(filt, Filter) else parse_filter(filt))


def _members(dest: Destination | Group) -> tuple[Destination, ...]:
    return dest.members if isinstance(dest, Group) else (dest,)


def _entry_key(entry: StateEntry) -> str:
    """A saved entry's identity, as far as its text tells without parsing it."""
    return entry.socket if not entry.filter else f"{entry.socket} filter={entry.filter}"
