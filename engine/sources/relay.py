"""The one step every source shares: validate notification bytes received from
outside and raise them as they are (SPEC section 8), counting every outcome.

A source (a datagram socket, a broker queue) owns one Relay per thing it reads.
The relay is the one writer of its counters, and keeps, under `lock`, per batch:

    received = rejected (by reason) + raised

A source asks it to count what the source refuses itself (`reject(reason, n)`,
before validation: a source not allowed, a truncated datagram, a stale message)
and what a batch that failed midway left unaccounted (`lose(before, n)`).

Per notification, `forward(data)` (the source counts); per batch,
`forward_batch(datas)` (counts itself, and raises the batch through the engine's
batched path: one lock, one ring publish per worker, per batch).

Reasons are wire.REJECT_REASONS and "engine_stopped" (read while the engine was
stopping), plus a source's own (a broker's "stale": older than max_age_ms). An event
raised is then the engine's to account (queued, or dropped for a full ring or no
subscribers).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal

from engine.errors import EngineError, SubscriptionError, UnknownEvent, WireError
from engine.statistics import SourceStatistics
from engine.wire import (
    MAX_PAYLOAD,
    REJECT_REASONS,
    NotificationRejected,
    check_event_name,
    check_notification,
)

if TYPE_CHECKING:
    from engine.producer import Engine

UnknownEvents = Literal["reject", "register"]
# The validation's reasons, and notifications read while the engine was stopping.
SOURCE_REJECT_REASONS: Final = (*REJECT_REASONS, "engine_stopped")


class Relay:
    """Validate-and-raise for one source, with its counters."""

    def __init__(
        self,
        engine: Engine,
        kind: str,
        name: str,
        unknown_events: UnknownEvents = "reject",
        reasons: tuple[str, ...] = SOURCE_REJECT_REASONS,
    ) -> None:
        self.engine = engine
        self.kind = kind
        self.name = name
        self.unknown_events = unknown_events
        # Written by the source's thread a batch at a time under `lock`, so a
        # snapshot never sees something received but not yet accounted for.
        self.lock = threading.Lock()
        self.received = 0
        self.raised = 0
        self.rejected = dict.fromkeys(reasons, 0)
        # Event ids the engine gave (they never change once given), a dict lookup
        # away; bounded by the engine's max_events.
        self._event_ids: dict[str, int] = {}

    def forward(self, data: bytes) -> str | None:
        """Validate `data` and raise it byte for byte: None if raised, else the
        reason it was rejected. Counts nothing (the caller counts, per batch)."""
        try:
            method = check_notification(data, limit=MAX_PAYLOAD)
            self.engine.raise_encoded(method, data)
        except NotificationRejected as exc:
            return exc.reason
        except UnknownEvent:
            return self._register(data, method)
        except EngineError:  # the engine has stopped: counted, never raised
            return "engine_stopped"
        return None

    def forward_batch(self, datas: Sequence[bytes]) -> None:
        """forward() for a batch, counting it: every notification of `datas` is
        validated and the valid ones raised byte for byte, in their order, with one
        Engine.raise_encoded_batch per run of known events (an unknown event ends
        the run: it is registered or rejected as forward() would, in its place).
        Adds len(datas) to `received`, and each to `raised` or to `rejected[reason]`
        (the reasons of forward()), so received = raised + rejected holds after it.
        Call it with `lock` held, so a snapshot sees all of the batch or none of it.
        Never raises for a notification: an engine that has stopped makes the
        notifications not yet raised "engine_stopped"."""
        self.received += len(datas)
        rejected = self.rejected
        known = self._event_ids
        check = check_notification  # its default limit is MAX_PAYLOAD
        eids: list[int] = []
        payloads: list[bytes] = []
        for data in datas:
            try:
                method = check(data)
                eid = known.get(method)
                if eid is None:
                    eid = known[method] = self.engine.event_id(method)
            except NotificationRejected as exc:
                rejected[exc.reason] += 1
                continue
            except UnknownEvent:
                self._raise_batch(eids, payloads)  # the events before it go first
                eids, payloads = [], []
                reason = self._register(data, method)
                if reason:
                    rejected[reason] += 1
                else:
                    self.raised += 1
                continue
            eids.append(eid)
            payloads.append(data)
        self._raise_batch(eids, payloads)

    def reject(self, reason: str, n: int = 1) -> None:
        """Count `n` notifications received and rejected for `reason` by the source
        itself (never validated nor raised). Call it with `lock` held."""
        if n:
            self.received += n
            self.rejected[reason] = self.rejected.get(reason, 0) + n

    def lose(self, received_before: int, n: int) -> None:
        """A batch of `n` that raised midway (`received` was `received_before` when it
        began): what it left unaccounted for is counted rejected "internal", so the
        identity still holds. Call it with `lock` held."""
        if self.received == received_before:  # read, but not yet counted
            self.received += n
        lost = self.received - self.raised - sum(self.rejected.values())
        if lost > 0:
            self.rejected["internal"] = self.rejected.get("internal", 0) + lost

    def _raise_batch(self, eids: list[int], payloads: list[bytes]) -> None:
        if not eids:
            return
        try:
            oversize = self.engine.raise_encoded_batch(eids, payloads)
        except EngineError:  # the engine has stopped: counted, never raised
            self.rejected["engine_stopped"] += len(eids)
            return
        self.raised += len(eids) - oversize
        self.rejected["oversize"] += oversize

    def _register(self, data: bytes, method: str) -> str | None:
        """An unknown event: with unknown_events = "register", learn it and raise the
        notification (None); else the reason it is rejected."""
        if self.unknown_events != "register":
            return "unknown_event"
        try:
            check_event_name(method)
        except WireError:
            return "malformed"
        try:
            self.engine.register_event(method)
            self.engine.raise_encoded(method, data)
        except SubscriptionError:  # no event slot left (engine.max_events)
            return "unknown_event"
        except EngineError:
            return "engine_stopped"
        return None

    def statistics(self, **extra: object) -> SourceStatistics:
        """A consistent snapshot; `extra` fills the source's own fields (up, errors...)."""
        with self.lock:
            return SourceStatistics(
                kind=self.kind,
                name=self.name,
                received=self.received,
                raised=self.raised,
                rejected=dict(self.rejected),
                **extra,  # type: ignore[arg-type]
            )
