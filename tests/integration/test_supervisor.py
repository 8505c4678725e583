"""Supervisor life cycle with real processes and real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.metrics import exposition
from engine.options import EngineOptions
from engine.producer import Engine, EngineError
from engine.shm.ring import KIND_EVENT
from engine.shm.segment import list_segments
from engine.wire import encode_notification
from tests.helpers.support import eventually, running_engine, udp_receiver, unique_instance

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from engine.options import EngineOptions
    from engine.producer import Engine
    engine = Engine(EngineOptions(instance=sys.argv[1]), events=["E_TEST"])
    engine.start()
    engine.subscribe("E_TEST", sys.argv[2])
    for seq in range(int(sys.argv[3])):
        engine.raise_event("E_TEST", {"seq": seq})
    pids = [w.pid for w in engine.statistics().workers]
    sys.exit(engine.run_until_signalled(on_ready=lambda: print(json.dumps(pids), flush=True)))
    """
)


def start_engine_process(
    instance: str, socket_text: str, events: int
) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE_SCRIPT, instance, socket_text, str(events)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"engine process failed: {proc.communicate(timeout=10)[1]}")
    return proc, json.loads(line)


def kill_if_running(proc: subprocess.Popen[str]) -> None:
    """A process that did not stop in time is killed, so a failure leaks nothing."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes once it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sigterm_drains_the_rings_and_leaves_no_segment() -> None:
    instance = unique_instance("term")
    rx = udp_receiver()
    try:
        proc, _pids = start_engine_process(instance, rx.socket_text, 5000)
        try:
            proc.send_signal(signal.SIGTERM)  # right after the burst was queued
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            kill_if_running(proc)
        got = rx.quiet(5000)
        assert sorted(json.loads(d)["params"]["seq"] for d in got) == list(range(5000))
        assert list_segments(instance) == []
    finally:
        rx.close()


def test_sigint_stops_cleanly_too() -> None:
    instance = unique_instance("int")
    rx = udp_receiver()
    try:
        proc, pids = start_engine_process(instance, rx.socket_text, 10)
        try:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            kill_if_running(proc)
        assert all(process_gone(pid) for pid in pids)
        assert list_segments(instance) == []
        assert len(rx.quiet(10)) == 10
    finally:
        rx.close()


def test_after_the_supervisor_is_killed_workers_die_and_a_restart_reclaims() -> None:
    instance = unique_instance("kill")
    rx = udp_receiver()
    try:
        proc, pids = start_engine_process(instance, rx.socket_text, 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        eventually(lambda: all(process_gone(pid) for pid in pids), what="orphan workers to exit")
        # The same instance must not be refused: the old owner is dead.
        with running_engine(["E_TEST"], instance=instance) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            rx.datagrams.clear()
            engine.raise_event("E_TEST", {"seq": 1})
            assert len(rx.wait_for(1)) == 1
    finally:
        rx.close()


def test_a_worker_that_cannot_boot_stops_the_engine_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "workers"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # shadows the real `workers` package
    instance = unique_instance("boot")
    engine = Engine(EngineOptions(instance=instance), events=["E_TEST"])
    started = time.monotonic()
    with pytest.raises(EngineError, match="failed to start 3 times in a row"):
        engine.start()
    assert time.monotonic() - started < 30  # no crash loop
    assert list_segments(instance) == []


def test_a_workers_folder_in_the_current_directory_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / "workers"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('wrong workers package')\n")
    monkeypatch.chdir(tmp_path)
    with running_engine(["E_TEST"]) as engine:
        assert all(w.alive for w in engine.statistics().workers)


def test_restarts_resume_from_the_shared_read_position() -> None:
    rx = udp_receiver()
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            for seq in range(500):  # queued while the worker is frozen
                engine.raise_event("E_TEST", {"seq": seq})
            os.kill(pid, signal.SIGKILL)
            eventually(lambda: engine.supervisor.ready(0), what="restart")
            got = rx.wait_for(500)
            assert sorted(json.loads(d)["params"]["seq"] for d in got) == list(range(500))
            stats = engine.statistics()
            stats.check_identity()
            assert stats.workers[0].restarts == 1
    finally:
        rx.close()


def test_a_worker_that_keeps_failing_on_a_record_stops_the_engine_clearly() -> None:
    from engine.shm.ring import KIND_SUBSCRIBE

    with running_engine(["E_TEST"]) as engine:
        # A control record no worker can decode (as if the ring were corrupted).
        with engine.hot_lock():
            assert engine.supervisor.rings[0].try_append(KIND_SUBSCRIBE, 0, 0, 0, b"\xc1junk")
        eventually(lambda: engine.failure is not None, timeout=30, what="the engine to give up")
        assert engine.failure is not None
        assert "failed 3 times in a row at ring position" in engine.failure
        assert engine.supervisor.restarts[0] == 2  # restarted twice, then given up on
        with pytest.raises(EngineError, match="failed 3 times"):
            engine.raise_event("E_TEST", {"seq": 0})


def test_stop_is_bounded_with_many_stuck_workers() -> None:
    # 12 workers that cannot drain (stopped, records waiting): each is killed
    # together with the others, not one after the other.
    rx = udp_receiver()
    try:
        engine_cm = running_engine(
            ["E_TEST"], workers=12, pin=False, drain_timeout_s=1.0, heartbeat_timeout_s=0
        )
        with engine_cm as engine:
            for _ in range(12):  # one subscriber per worker (the router spreads them)
                other = udp_receiver()
                engine.subscribe("E_TEST", other.socket_text)
                other.close()
            pids = [w.pid for w in engine.statistics().workers]
            for pid in pids:
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
            for seq in range(50):
                engine.raise_event("E_TEST", {"seq": seq})
            start = time.monotonic()
            engine.stop()
            took = time.monotonic() - start
        assert took < 8.0, f"stop took {took:.1f} s"  # a second in a row each: 13 s
    finally:
        rx.close()


def test_a_lost_wake_up_is_made_up_for_by_the_supervisor() -> None:
    """A record published behind the producer's back (no ring of the doorbell) reaches
    the subscriber all the same: the supervisor sees the worker asleep with records
    waiting on two ticks in a row, rings, and counts it."""
    rx = udp_receiver()
    try:
        with running_engine(workers=1, idle_poll_ms=0) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            engine.raise_event("E_TEST", {"seq": 0})
            assert len(rx.wait_for(1)) == 1
            supervisor = engine.supervisor
            ring = supervisor.rings[0]
            eventually(lambda: ring.asleep, what="the worker asleep")
            payload = encode_notification("E_TEST", {"seq": 1})
            with engine.hot_lock():
                assert ring.try_append(
                    KIND_EVENT, engine.event_id("E_TEST"), 1, time.monotonic_ns(), payload
                )
            assert len(rx.wait_for(2)) == 2, "the worker slept through a published record"
            assert json.loads(rx.datagrams[1])["params"] == {"seq": 1}
            assert supervisor.nudges == [1]
            assert engine.statistics().workers[0].lost_wakeups == 1
            body, _ = exposition(engine)
            assert b'event_datagram_worker_lost_wakeups_total{worker="0"} 1.0' in body, body
    finally:
        rx.close()
