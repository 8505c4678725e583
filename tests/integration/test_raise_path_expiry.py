"""Expiry under a raise loop: removed in memory at once, the state file rewritten
off the raise path (the raise path never waits on a file write)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from engine import state
from tests.helpers.support import Receiver, running_engine, udp_receiver

SLOW_WRITE_S = 0.2  # each state-file fsync, once the subscriptions are in


@pytest.fixture
def slow_fsync(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Once set, every fsync of the state module sleeps SLOW_WRITE_S first (a slow
    disk); counts the slow writes in `slow_fsync.count`."""
    armed = threading.Event()
    real_fsync = os.fsync
    armed.count = 0  # type: ignore[attr-defined]

    def fsync(fd: int) -> None:
        if armed.is_set():
            armed.count += 1  # type: ignore[attr-defined]
            time.sleep(SLOW_WRITE_S)
        real_fsync(fd)

    monkeypatch.setattr(state.os, "fsync", fsync)
    return armed


def test_expiry_under_a_raise_loop_never_waits_on_the_state_file(
    tmp_path: Path, slow_fsync: threading.Event
) -> None:
    state_file = tmp_path / "state.json"
    keeper = udp_receiver()
    expiring: list[Receiver] = [udp_receiver() for _ in range(8)]
    try:
        with running_engine(state_file=str(state_file)) as engine:
            engine.subscribe("E_TEST", keeper.socket_text, 3600)
            for rx in expiring:
                engine.subscribe("E_TEST", rx.socket_text, 1)
            expires_at = time.time() + 1
            slow_fsync.set()
            worst = 0.0
            raised = 0
            deadline = time.monotonic() + 3.0  # past the expiry and the slow rewrite
            while time.monotonic() < deadline:
                start = time.perf_counter()
                engine.raise_event("E_TEST", {"seq": raised, "at": time.time()})
                worst = max(worst, time.perf_counter() - start)
                raised += 1
                time.sleep(0.0005)
            slow_fsync.clear()
            # The expired subscribers were removed (and the file rewritten without
            # them) while the loop ran, off its thread...
            assert slow_fsync.count >= 1, "the state file was not rewritten during the loop"  # type: ignore[attr-defined]
            saved = json.loads(state_file.read_text())
            assert [e["socket"] for e in saved["subscriptions"]] == [keeper.socket_text]
            # ...and the raise path never waited for it.
            assert worst < SLOW_WRITE_S / 4, f"a raise took {worst * 1000:.1f} ms"
        engine.statistics().check_identity()
        assert len(keeper.quiet(expect=raised)) == raised
        for rx in expiring:
            # Nothing raised after the expiry instant reached an expired subscriber.
            late = [d for d in rx.quiet() if json.loads(d)["params"]["at"] >= expires_at + 0.01]
            assert late == []
    finally:
        keeper.close()
        for rx in expiring:
            rx.close()


def test_a_refresh_moves_the_expiry_the_raise_path_acts_on() -> None:
    refreshed, lapsed = udp_receiver(), udp_receiver()
    try:
        with running_engine() as engine:
            engine.subscribe("E_TEST", refreshed.socket_text, 1)
            engine.subscribe("E_TEST", lapsed.socket_text, 1)
            time.sleep(0.5)
            engine.subscribe("E_TEST", refreshed.socket_text, 3)  # refreshed before it expires
            time.sleep(0.8)  # past the first expiry instant, before the refreshed one
            engine.raise_event("E_TEST", {"seq": 1})
            assert len(refreshed.wait_for(1)) == 1
            assert lapsed.quiet() == []
            # Expired and re-subscribed before any sweep: routed again, exactly once.
            engine.subscribe("E_TEST", lapsed.socket_text, 3)
            engine.raise_event("E_TEST", {"seq": 2})
            assert len(lapsed.wait_for(1)) == 1
            assert len(refreshed.wait_for(2)) == 2
        engine.statistics().check_identity()
        assert len(lapsed.quiet()) == 1 and len(refreshed.quiet()) == 2
    finally:
        refreshed.close()
        lapsed.close()
