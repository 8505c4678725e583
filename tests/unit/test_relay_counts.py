"""The relay is the one writer of its counts: received = raised + rejected holds
whatever a source asks it to count."""

from __future__ import annotations

from engine.options import EngineOptions
from engine.producer import Engine
from engine.sources.relay import Relay


def _relay() -> Relay:
    # Never started: these counts touch no ring (forward_batch would raise
    # "engine_stopped", which is counted the same way).
    return Relay(Engine(EngineOptions(instance="relay-unit")), "ingest", "unit")


def _identity(relay: Relay) -> bool:
    return relay.received == relay.raised + sum(relay.rejected.values())


def test_reject_counts_received_and_reason() -> None:
    relay = _relay()
    with relay.lock:
        relay.reject("source_not_allowed", 3)
        relay.reject("oversize", 0)  # nothing: no change, no new key
        relay.reject("stale")  # a source's own reason, not known in advance
    assert relay.received == 4
    assert relay.rejected["source_not_allowed"] == 3 and relay.rejected["stale"] == 1
    assert relay.rejected["oversize"] == 0
    assert relay.statistics().rejected["stale"] == 1 and _identity(relay)


def test_forward_batch_on_a_stopped_engine_keeps_identity() -> None:
    relay = _relay()
    note = b'{"jsonrpc":"2.0","method":"E_X","params":{}}'
    with relay.lock:
        relay.forward_batch([note, b"not json"])
    assert relay.received == 2 and relay.raised == 0 and _identity(relay)


def test_lose_counts_what_a_failed_batch_left() -> None:
    relay = _relay()
    with relay.lock:
        before = relay.received
        relay.lose(before, 5)  # failed before counting anything
    assert relay.received == 5 and relay.rejected["internal"] == 5 and _identity(relay)
    with relay.lock:
        before = relay.received
        relay.received += 2  # counted its batch, then failed before accounting it
        relay.lose(before, 2)
    assert relay.received == 7 and relay.rejected["internal"] == 7 and _identity(relay)
