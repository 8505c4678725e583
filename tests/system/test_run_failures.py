"""`event-datagram run` that cannot start exits 1 at once with the reason, and
frees everything; SIGHUP reloads and the engine keeps running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.shm.segment import list_segments
from tests.helpers.support import unique_instance


def _config(tmp_path: Path, instance: str, **mi: str) -> Path:
    lines = ["events = [\"E_TEST\"]", "[engine]", "workers = 1", "pin = false",
             f'instance = "{instance}"', f'runtime_dir = "{tmp_path}"', "[state]",
             "enabled = false", "[mi]"]  # fmt: skip
    lines += [f'{key} = "{value}"' for key, value in mi.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(config: Path, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return done, time.monotonic() - start


def test_a_taken_mi_datagram_port_is_a_clean_exit_1_naming_it(tmp_path: Path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    instance = unique_instance("busy")
    try:
        # The HTTP listener binds first, then the datagram one fails: the HTTP one
        # must be closed without waiting for a serve loop that never started.
        cfg = _config(tmp_path, instance, http="127.0.0.1:0", datagram=f"127.0.0.1:{port}")
        done, took = _run(cfg)
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port} (MI datagram): Address already in use" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert took < 15  # a Python start-up and a worker boot, not a hang
    assert not list_segments(instance), "shared memory left behind"


def test_a_fifo_in_a_missing_directory_is_a_clean_exit_1_naming_it(tmp_path: Path) -> None:
    instance = unique_instance("fifo")
    fifo = tmp_path / "missing" / "mi.fifo"
    cfg = _config(tmp_path, instance, http="127.0.0.1:0", datagram="127.0.0.1:0", fifo=str(fifo))
    done, _ = _run(cfg)
    assert done.returncode == 1, done.stderr
    assert f"cannot create the MI FIFO {fifo}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list_segments(instance), "shared memory left behind"


def test_sighup_reloads_and_the_engine_keeps_running(tmp_path: Path) -> None:
    """Operators expect SIGHUP to reload (tests/system/test_service.py: under load);
    the engine stops at SIGTERM, as before."""
    instance = unique_instance("hup")
    cfg = _config(tmp_path, instance, http="", datagram="127.0.0.1:0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "--config", str(cfg)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "event-datagram ready" in line:
                break
        else:
            raise AssertionError(f"never ready (exit {proc.wait(5)})")
        os.kill(proc.pid, signal.SIGHUP)
        for line in proc.stderr:
            if "reloaded the config" in line:
                break
        else:
            raise AssertionError(f"no reload (exit {proc.wait(5)})")
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert not list_segments(instance), "shared memory left behind"
