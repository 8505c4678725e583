"""The engine as a process an operator watches: --version and the version verb,
build_info and the main process's process_* metrics, log level and format,
timestamps on every line (the ready line too) except under journald."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from engine import version
from tests.helpers.mi import EXE, RunProc, client, processes
from tests.helpers.support import unique_instance

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def _config(tmp_path: Path, http: str = '""') -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'events = ["E_A"]\n[engine]\ninstance = "{unique_instance("obs")}"\nworkers = 1\n'
        f'pin = false\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[mi]\nhttp = {http}\ndatagram = "127.0.0.1:0"\n[state]\nenabled = false\n'
    )
    return cfg


def test_version_flag_and_verb() -> None:
    done = client("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"event-datagram {version.version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version.version())
    done = client("version")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rb"event-datagram \S+ \(python 3\.\d+\.\d+\S*, msgspec \d+\.\d+\S*\)\n", done.stdout
    ), done.stdout


def test_build_info_and_the_main_process_metrics(tmp_path: Path) -> None:
    with processes() as procs:
        run = RunProc("--config", str(_config(tmp_path, '"127.0.0.1:0"')))
        procs.append(run)
        assert run.http
        url = run.http.removesuffix("/mi") + "/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        created = psutil.Process(run.popen.pid).create_time()
        assert run.stop() == 0, run.stderr
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = families["event_datagram_build_info"].samples
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["version"] == version.version()
    assert set(info[0].labels) == {"version", "python", "msgspec"}
    # prometheus-client's ProcessCollector describes the main process (this pid) ...
    start = families["process_start_time_seconds"].samples[0].value
    assert abs(start - created) < 0.02  # both read /proc/PID/stat: the main process
    assert families["process_resident_memory_bytes"].samples[0].value > 1e6
    assert "process_cpu_seconds" in families and "process_open_fds" in families
    # ... beside the workers' own series.
    assert families["event_datagram_worker_resident_memory_bytes"].samples
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "a metric name twice"


def test_every_line_has_a_timestamp_and_the_level_applies(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    with processes() as procs:
        run = RunProc("--config", str(cfg), "--log-level", "warning")
        procs.append(run)
        os.kill(run.popen.pid, signal.SIGHUP)
        run.wait_err("reloaded the config")
        assert run.stop() == 0
    lines = run.stderr.splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines
    assert lines[0].split(" ", 3)[3].startswith("event_datagram: event-datagram ready: ")
    assert not [line for line in lines if " INFO " in line and "ready" not in line
                and "reloaded" not in line]  # fmt: skip


def test_json_lines(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + '[log]\nformat = "json"\nlevel = "debug"\n')
    with processes() as procs:
        run = RunProc("--config", str(cfg))
        procs.append(run)
        assert run.stop() == 0
    records = [json.loads(line) for line in run.stderr.splitlines()]
    assert records and all(set(r) == {"time", "level", "logger", "message"} for r in records)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["time"])
    assert records[0]["message"].startswith("event-datagram ready: ")
    # --log-format overrides the file
    done = client("run", "--config", str(cfg), "--log-format", "text", "--workers", "0x")
    assert done.returncode == 2


def test_no_timestamps_when_journald_stamps_the_lines(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = subprocess.Popen(
        [EXE, "run", "--config", str(_config(tmp_path))],
        stderr=write_end, stdout=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end, "r") as stream:
            first = stream.readline()
            proc.send_signal(signal.SIGTERM)
            rest = stream.read()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert first.startswith("INFO event_datagram: event-datagram ready: "), first
    assert not any(STAMP.match(line) for line in [first, *rest.splitlines()])


WORKER_LOG = (
    "import logging, sys; from workers import logs; logs.setup(); "
    "logging.getLogger('event_datagram.worker').warning('w %s', 1)"
)


def test_workers_log_like_the_main_process() -> None:
    """What `run` puts in EVENT_DATAGRAM_LOG, a worker follows (workers/logs.py)."""

    def worker_line(value: str | None) -> str:
        env = {
            k: v for k, v in os.environ.items() if k not in ("EVENT_DATAGRAM_LOG", "JOURNAL_STREAM")
        }
        if value is not None:
            env["EVENT_DATAGRAM_LOG"] = value
        done = subprocess.run(
            [sys.executable, "-c", WORKER_LOG], env=env, capture_output=True, text=True,
            timeout=60, check=True,
        )  # fmt: skip
        return done.stderr

    assert STAMP.match(worker_line("text:INFO"))
    assert worker_line("text:INFO").endswith(" WARNING event_datagram.worker: w 1\n")
    record = json.loads(worker_line("json:WARNING"))
    assert set(record) == {"time", "level", "logger", "message"} and record["message"] == "w 1"
    assert worker_line("text:ERROR") == ""  # below the level
    assert worker_line(None) == "w 1\n"  # not under `run`: Python's default
