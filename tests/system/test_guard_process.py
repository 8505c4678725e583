"""`event-datagram run` as a process: a broker password given on the command line
is rewritten out of /proc/PID/cmdline (issue 17, item 7), and every UDP listener
bound beyond loopback without a narrow allow-list is warned about (item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.mi import RunProc
from tests.helpers.support import unique_instance

pytestmark = pytest.mark.slow

SECRET = "pw-0f-the-broker"


def config_file(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "engine.toml"
    path.write_text(
        "[engine]\n"
        f'instance = "{unique_instance("argv")}"\n'
        "workers = 1\n"
        "pin = false\n"
        f'runtime_dir = "{tmp_path / "run"}"\n'
        "[state]\n"
        "enabled = false\n" + extra
    )
    return str(path)


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_a_password_given_with_amqp_is_not_in_proc_cmdline(tmp_path: Path) -> None:
    # Port 1: no broker there; the source retries in its thread, the engine runs.
    url = f"amqp://edg:{SECRET}@127.0.0.1:1/%2F"
    extra = '[mi]\ndatagram_allow = ["0.0.0.0/0"]\n'
    proc = RunProc(
        "--config", config_file(tmp_path, extra), "--http", "", "--amqp", url,
        "--mi-datagram", "0.0.0.0:0", "--ingest", "udp:0.0.0.0:0",
    )  # fmt: skip
    try:
        shown = cmdline(proc.popen.pid)
        assert SECRET.encode() not in shown
        assert b"amqp://edg:***@127.0.0.1:1/%2F" in shown  # the rest of the title stays
        err = proc.stderr
        assert err.count("broker password was on the command line") == 1
        assert "url_file" in err and "--amqp-url-file" in err
        assert SECRET not in err
        # The UDP listeners bound beyond loopback: one warning each.
        assert "lets every address send" in err and "MI datagram udp:0.0.0.0:" in err
        assert "ingest.allow is empty" in err and "ingest socket udp:0.0.0.0:" in err
    finally:
        assert proc.stop() == 0, proc.stderr


def test_amqp_url_file_keeps_argv_clean(tmp_path: Path) -> None:
    secret_file = tmp_path / "amqp-url"
    secret_file.write_text(f"amqp://edg:{SECRET}@127.0.0.1:1/%2F\n")
    secret_file.chmod(0o600)
    proc = RunProc(
        "--config", config_file(tmp_path), "--http", "", "--mi-datagram", "",
        "--amqp-url-file", str(secret_file),
    )  # fmt: skip
    try:
        assert SECRET.encode() not in cmdline(proc.popen.pid)
        assert "amqp://127.0.0.1:1/%2F opensips" in proc.ready  # named without credentials
        assert "command line" not in proc.stderr and SECRET not in proc.stderr
    finally:
        assert proc.stop() == 0, proc.stderr
