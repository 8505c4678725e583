"""The ingest thread never dies and never floods the log (issue 19, "a source never
dies"): an ingest socket whose reads fail (here its descriptor is made a pipe
under the running thread, so recvmmsg fails with ENOTSOCK at every poll) is
counted, logged once, rested with back-off while the other socket is read on,
and read again once it works."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from engine import config
from engine.cli.run import Runner
from engine.statistics import SourceStatistics
from tests.helpers.support import eventually, udp_receiver, unique_instance

EVENT = b'{"jsonrpc":"2.0","method":"E_IN","params":{"n":1}}'


def test_a_failing_ingest_socket_is_counted_rested_and_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "event_datagram")
    text = (
        'events = ["E_IN"]\n'
        f'[engine]\ninstance = "{unique_instance("ig")}"\nworkers = 1\npin = false\n'
        f'runtime_dir = "{tmp_path / "rt"}"\n'
        '[mi]\nhttp = ""\ndatagram = ""\n[state]\nenabled = false\n'
        '[ingest]\nlisten = ["udp:127.0.0.1:0", "udp:127.0.0.1:0"]\n'
    )
    runner = Runner(config.loads(text))
    runner.start()
    receiver = udp_receiver()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r, w = os.pipe()
    saved = -1
    try:
        assert runner.ingest is not None
        ingest = runner.ingest
        a, b = ingest.sockets
        runner.engine.subscribe("E_IN", receiver.socket_text, 60)

        def send(sock_name: str) -> None:
            host, port = sock_name.removeprefix("udp:").rsplit(":", 1)
            sender.sendto(EVENT, (host, int(port)))

        def stat(name: str) -> SourceStatistics:
            (s,) = [s for s in ingest.statistics() if s.name == name]
            return s

        for sock in (a, b):
            send(sock.name)
        assert len(receiver.wait_for(2)) == 2

        # Break a: its descriptor becomes a readable pipe (recvmmsg: ENOTSOCK).
        saved = os.dup(a.sock.fileno())
        os.write(w, b"x")
        os.dup2(r, a.sock.fileno())
        eventually(lambda: stat(a.name).errors["receive_failed"] >= 3, 30, "retried failures")
        assert ingest.guard.alive
        send(b.name)  # b is read on meanwhile
        assert len(receiver.wait_for(3)) == 3
        said = [x.getMessage() for x in caplog.records if a.name in x.getMessage()]
        assert len(said) == 1 and "non-socket" in said[0], said  # once, not per retry
        assert stat(b.name).errors == {"receive_failed": 0, "internal": 0, "thread_died": 0}

        # Mended: read again at its next try.
        os.dup2(saved, a.sock.fileno())
        send(a.name)
        assert len(receiver.wait_for(4, timeout=30)) == 4
        eventually(
            lambda: any("reading again" in x.getMessage() for x in caplog.records), 10, "a line"
        )
        for sock in (a, b):
            s = stat(sock.name)
            assert (s.received, s.raised) == (2, 2), s
        runner.engine.statistics().check_identity()
    finally:
        for fd in (r, w, saved):
            if fd >= 0:
                os.close(fd)
        sender.close()
        receiver.close()
        runner.stop()
