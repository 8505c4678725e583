"""The sd_notify sender: which environment it obeys (a real socket receives)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from engine.cli.notify import Notifier


def test_off_without_a_notify_socket_or_with_a_relative_one() -> None:
    for env in ({}, {"NOTIFY_SOCKET": "relative/path"}):
        notifier = Notifier(env)
        assert not notifier.enabled
        notifier.ready()  # does nothing, raises nothing


def test_watchdog_interval_and_pid() -> None:
    mine = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_s == 2.0  # half the interval
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": mine}).watchdog_s == 2.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "x"}).watchdog_s is None


def test_messages_arrive_and_a_gone_manager_is_not_fatal(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000000"})  # 5 min
        notifier.ready("up")
        notifier.watchdog()
        notifier.watchdog()  # not due yet: one ping
        notifier.stopping()
        sock.settimeout(5)
        got = [sock.recv(100) for _ in range(3)]
    assert got == [b"READY=1\nSTATUS=up", b"WATCHDOG=1", b"STOPPING=1"]
    os.unlink(path)
    notifier.stopping()  # the socket is gone: logged once, never raised
