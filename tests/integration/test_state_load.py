"""Loading a state file never drops or rewrites away subscriptions silently, and
a clock that ran ahead cannot make a subscription immortal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.errors import StateFileError
from engine.options import EngineOptions
from engine.producer import Engine
from engine.shm.segment import list_segments
from tests.helpers.support import eventually, running_engine, udp_receiver, unique_instance


def _write_state(path: Path, entries: list[dict[str, object]]) -> bytes:
    data = json.dumps({"version": 1, "subscriptions": entries}).encode()
    path.write_bytes(data)
    return data


def _refused(path: Path) -> StateFileError:
    opts = EngineOptions(instance=unique_instance("st"))
    engine = Engine(opts, events=["E_TEST"], state_file=str(path))
    with pytest.raises(StateFileError) as info:
        engine.start()
    engine.stop()
    assert not list_segments(opts.instance)
    return info.value


def test_a_subscription_saved_in_the_future_counts_from_now(tmp_path: Path) -> None:
    rx = udp_receiver()
    path = tmp_path / "state.json"
    far = time.time() + 86_400  # a clock that ran a day ahead when it was saved
    _write_state(path, [{"event": "E_TEST", "socket": rx.socket_text, "expire": 2,
                         "subscribed_at": far}])  # fmt: skip
    try:
        with running_engine(state_file=str(path)) as engine:
            (sub,) = engine.registry.subscribers("E_TEST")
            assert sub.ttl(engine.registry.clock()) <= 2
            engine.raise_event("E_TEST", {"seq": 1})
            assert len(rx.wait_for(1)) == 1
            # ...and it expires on time instead of in a day.
            eventually(lambda: not engine.registry.subscribers("E_TEST"), timeout=5,
                       what="the expiry")  # fmt: skip
            assert engine.raise_event("E_TEST", {"seq": 2}).no_subscribers
        assert json.loads(path.read_text())["subscriptions"] == []
    finally:
        rx.close()


def test_events_the_config_does_not_name_stop_the_start_and_the_file_stays(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    now = time.time()
    before = _write_state(path, [
        {"event": "E_GONE", "socket": "udp:127.0.0.1:9000", "expire": 600, "subscribed_at": now},
        {"event": "E_GONE", "socket": "udp:127.0.0.1:9001", "expire": 600, "subscribed_at": now},
        {"event": "E_TEST", "socket": "udp:127.0.0.1:9002", "expire": 600, "subscribed_at": now},
    ])  # fmt: skip
    error = _refused(path)
    assert "events the config does not name: E_GONE (2)" in str(error)
    assert 'state.unknown_events = "register"' in str(error)
    assert path.read_bytes() == before  # nothing rewritten away


def test_dropping_unknown_events_is_an_explicit_choice(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    now = time.time()
    _write_state(path, [
        {"event": "E_GONE", "socket": "udp:127.0.0.1:9000", "expire": 600, "subscribed_at": now},
        {"event": "E_TEST", "socket": "udp:127.0.0.1:9002", "expire": 600, "subscribed_at": now},
    ])  # fmt: skip
    opts = EngineOptions(instance=unique_instance("drop"))
    with Engine(opts, events=["E_TEST"], state_file=str(path), unknown_events="drop") as engine:
        assert [s.dest.key for s in engine.registry.subscribers("E_TEST")] == ["udp:127.0.0.1:9002"]
        assert "E_GONE" not in dict(engine.registry.events())
    saved = json.loads(path.read_text())["subscriptions"]
    assert [e["event"] for e in saved] == ["E_TEST"]


def test_more_saved_events_than_slots_is_a_start_up_error_naming_max_events(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    now = time.time()
    before = _write_state(path, [
        {"event": f"E_{i}", "socket": "udp:127.0.0.1:9000", "expire": 600, "subscribed_at": now}
        for i in range(300)
    ])  # fmt: skip
    opts = EngineOptions(instance=unique_instance("slots"), max_events=256)
    engine = Engine(opts, events=["E_TEST"], state_file=str(path), unknown_events="register")
    with pytest.raises(StateFileError, match=r"engine\.max_events = 256 .* at least 301"):
        engine.start()
    engine.stop()
    assert path.read_bytes() == before  # the 300 subscriptions are all still there
    assert not list_segments(opts.instance)
