"""The one step every source shares: validate notification bytes received from
outside and raise them as they are (SPEC section 8), counting every outcome.

A source (a datagram socket, a broker queue) owns one Relay per thing it reads
and keeps, under `lock`, per batch:

    received = rejected (by reason) + raised

Reasons are wire.REJECT_REASONS and "engine_stopped" (read while the engine was
stopping), plus a source's own (a broker's "stale": older than max_age_ms). An event
raised is then the engine's to account (queued, or dropped for a full ring or no
subscribers).
"""

from __future__ import annotations

import threading
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
