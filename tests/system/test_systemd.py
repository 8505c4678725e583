"""systemd: the unit file passes `systemd-analyze verify`, and `run` speaks the
notify protocol on a real NOTIFY_SOCKET (READY=1 once its listeners answer,
RELOADING=1 with MONOTONIC_USEC on SIGHUP then READY=1, STOPPING=1, WATCHDOG=1)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from engine.mi.client import call
from tests.helpers.mi import EXE, RunProc, processes
from tests.helpers.support import unique_instance

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "event-datagram.service"


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (Debian's systemd package)")
        pytest.skip("systemd-analyze is missing (Debian's systemd package)")
    return found


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # verify checks that ExecStart exists: point it at this environment's command.
    unit = tmp_path / "event-datagram.service"
    unit.write_text(unit_text.replace("/usr/local/bin/event-datagram", EXE))
    return subprocess.run(
        [_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_unit_file_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    done = _verify(text, tmp_path)
    assert done.returncode == 0 and "event-datagram.service" not in done.stderr, done.stderr
    keys = ("Type=notify", "StateDirectory=event-datagram", "RuntimeDirectory=event-datagram",
            "KillMode=mixed", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=")  # fmt: skip
    assert all(key in text for key in keys)
    # The check can fail: a typo in a directive is reported.
    broken = _verify(text.replace("Type=notify", "Type=notfy"), tmp_path)
    assert "event-datagram.service:" in broken.stderr and "notfy" in broken.stderr, broken.stderr


class NotifySocket:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def wait(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """The next message (after those already taken) that sets `key`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)
            if key in fields:
                return fields
        raise AssertionError(f"no {key} in {timeout} s; got {self.messages}")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifications_on_a_real_notify_socket(tmp_path: Path, abstract: bool) -> None:
    name = f"edg-notify-{os.getpid()}-{unique_instance()}"
    address, env_value = (f"\0{name}", f"@{name}") if abstract else (str(tmp_path / "n"),) * 2
    notify = NotifySocket(address)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'events = ["E_A"]\n[engine]\ninstance = "{unique_instance("ntf")}"\nworkers = 1\n'
        f'pin = false\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[mi]\nhttp = ""\ndatagram = "127.0.0.1:0"\n[state]\nenabled = false\n'
    )
    env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    with processes() as procs:
        run = RunProc("--config", str(cfg), env=env)
        procs.append(run)
        ready = notify.wait("READY")
        assert ready["READY"] == "1"
        assert run.udp and call(run.udp, "events_list", [])  # listening by then
        assert notify.wait("WATCHDOG")["WATCHDOG"] == "1"
        before = time.monotonic_ns() // 1000
        os.kill(run.popen.pid, signal.SIGHUP)
        reloading = notify.wait("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) >= before  # the same clock as systemd's
        assert notify.wait("READY")["READY"] == "1"  # reloaded
        run.popen.send_signal(signal.SIGTERM)
        assert notify.wait("STOPPING")["STOPPING"] == "1"
        assert run.stop() == 0, run.stderr
    order = [k for m in notify.messages for k in m if k in ("READY", "RELOADING", "STOPPING")]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"]
    notify.sock.close()
    assert re.search(r"reloaded the config", run.stderr)
