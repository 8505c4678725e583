"""systemd's notify protocol (sd_notify(3)) in a few lines: one datagram to
$NOTIFY_SOCKET per state change ("READY=1", "RELOADING=1", "STOPPING=1",
"WATCHDOG=1"); an address starting with '@' is in the abstract namespace.
Without $NOTIFY_SOCKET (not under systemd) every call does nothing."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("event_datagram.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 2e6  # ping at half the interval, as systemd advises
        self._next_ping = 0.0
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        data = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:  # once: a service manager that went away is not news
                log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            self._failed = True

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # MONOTONIC_USEC tells systemd (253+) which reload this is.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping when due (call it often: from the main loop)."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_s
            self.send("WATCHDOG=1")

    def with_status(self, status: str) -> None:
        self.send(f"STATUS={status}")
