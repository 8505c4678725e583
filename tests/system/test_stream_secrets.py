"""`event-datagram run` with a [[stream]] whose credentials stay off the command line
(issue 22 by issue 17's rule, item 7): `run --stream URL` rewrites the password out
of /proc/PID/cmdline and still reads the stream with it; a [[stream]] with url_file
(and amqp_url_env for the declare) reads a real broker's stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.testing.broker import LocalBroker
from tests.helpers.mi import RunProc
from tests.helpers.support import Receiver, eventually, udp_receiver, unique_instance
from tests.system.test_stream import Publisher, notification, unique

pytestmark = pytest.mark.slow

SECRET = "pw-0f-the-stream"


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def config_file(tmp_path: Path, rx: Receiver | None, extra: str = "") -> str:
    path = tmp_path / "engine.toml"
    subscription = f'[[subscription]]\nevent = "E_A"\nsocket = "{rx.socket_text}"\n' if rx else ""
    path.write_text(
        'events = ["E_A"]\n'
        "[engine]\n"
        f'instance = "{unique_instance("ssec")}"\n'
        "workers = 1\n"
        "pin = false\n"
        f'runtime_dir = "{tmp_path / "run"}"\n'
        '[mi]\nhttp = ""\ndatagram = ""\n'
        "[state]\nenabled = false\n" + subscription + extra
    )
    return str(path)


def relays(publisher: Publisher, rx: Receiver) -> None:
    """Publish until the engine's source reads the stream (it starts at `next`)."""
    probe = notification("E_A", 0)

    def delivered() -> bool:
        publisher.publish(probe)
        return bool(rx.wait_for(1, timeout=0.2))

    eventually(delivered, timeout=30, what="a message relayed from the stream")
    rx.quiet()
    start = len(rx.datagrams)
    sent = [notification("E_A", 1 + i) for i in range(50)]
    for body in sent:
        publisher.publish(body)
    assert rx.quiet(expect=start + len(sent))[start:] == sent


def test_a_password_given_with_stream_is_not_in_proc_cmdline(tmp_path: Path) -> None:
    # Port 1: no broker there; the source retries in its thread, the engine runs.
    url = f"rabbitmq-stream://edg:{SECRET}@127.0.0.1:1/%2F"
    proc = RunProc("--config", config_file(tmp_path, None), "--stream", url)
    try:
        shown = cmdline(proc.popen.pid)
        assert SECRET.encode() not in shown
        assert b"rabbitmq-stream://edg:***@127.0.0.1:1/%2F" in shown  # the rest stays
        assert "rabbitmq-stream://127.0.0.1:1/%2F opensips" in proc.ready
        err = proc.stderr
        assert err.count("broker password was on the command line") == 1
        assert "[[stream]] url_file" in err and "--stream-url-file" in err
        assert SECRET not in err
    finally:
        assert proc.stop() == 0, proc.stderr


def test_run_stream_reads_the_stream_with_the_hidden_password(
    rabbitmq: LocalBroker, tmp_path: Path
) -> None:
    """`run --stream URL`: a [[stream]] of defaults (stream and exchange "opensips",
    declare = false), its password gone from the title but used to log in."""
    publisher = Publisher(rabbitmq.url, "opensips")
    publisher.declare_stream("opensips")
    rx = udp_receiver()
    proc = RunProc("--config", config_file(tmp_path, rx), "--stream", rabbitmq.stream_url)
    try:
        user, _, password = rabbitmq.stream_url.split("//", 1)[1].split("@")[0].partition(":")
        shown = cmdline(proc.popen.pid)
        assert f"{user}:{password}@".encode() not in shown
        assert f"{user}:***@".encode() in shown
        relays(publisher, rx)
        assert f"{user}:{password}@" not in proc.stderr
    finally:
        assert proc.stop() == 0, proc.stderr
        rx.close()
        publisher.close()


def test_a_stream_with_url_file_reads_a_real_broker(rabbitmq: LocalBroker, tmp_path: Path) -> None:
    """[[stream]] url_file (the stream listener) and amqp_url_env (the declare's
    URL), in a `run` process: the stream is declared, bound and read, and no URL
    with its credentials is in argv, the config or the log."""
    exchange, stream = unique("x"), unique("s")
    publisher = Publisher(rabbitmq.url, exchange)
    rx = udp_receiver()
    url_file = tmp_path / "stream-url"
    url_file.write_text(f"{rabbitmq.stream_url}\n")
    url_file.chmod(0o600)
    extra = (
        f'[[stream]]\nurl_file = "{url_file}"\namqp_url_env = "EDG_TEST_DECLARE_URL"\n'
        f'stream = "{stream}"\nexchange = "{exchange}"\ndeclare = true\n'
    )
    config = config_file(tmp_path, rx, extra)
    assert "guest" not in Path(config).read_text()
    proc = RunProc("--config", config, env={"EDG_TEST_DECLARE_URL": rabbitmq.url})
    try:
        assert b"guest" not in cmdline(proc.popen.pid)
        assert f"rabbitmq-stream://127.0.0.1:{rabbitmq.stream_port}/%2F {stream}" in proc.ready
        relays(publisher, rx)
        assert "guest:guest" not in proc.stderr and "command line" not in proc.stderr
    finally:
        assert proc.stop() == 0, proc.stderr
        rx.close()
        publisher.close()
