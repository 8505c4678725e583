"""`event-datagram run` as a service manager runs it: real processes under load.

- SIGTERM or SIGINT to the whole process group (systemd, `timeout`, `docker stop`,
  Ctrl-C) drains like SIGTERM to the main process: exit 0, no ERROR line, every
  event the MI answered OK reaches every subscriber, and no subscriber misses an
  event another one got.
- SIGHUP reloads the config under load (a good config, then a bad one): nothing
  is lost, the bad one keeps the running config and says so on /metrics.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import MIClientError, MIReplyError
from engine.mi.client import call
from engine.shm.segment import list_segments
from tests.helpers.mi import RunProc, processes
from tests.helpers.support import Receiver, eventually, udp_receiver, unique_instance

SUBSCRIBERS = 6


def write_config(
    path: Path,
    instance: str,
    rxs: list[Receiver],
    *,
    events: tuple[str, ...] = ("E_LOAD", "E_BULK"),
    extra: str = "",
) -> Path:
    subs = "".join(
        f'[[subscription]]\nevent = "{e}"\nsocket = "{rx.socket_text}"\n'
        for rx in rxs
        for e in ("E_LOAD", "E_BULK")
    )
    path.write_text(
        f"events = {json.dumps(list(events))}\n"
        f'[engine]\ninstance = "{instance}"\nworkers = 1\npin = false\n'
        f'runtime_dir = "{path.parent / "run"}"\n'
        f'[mi]\nhttp = "127.0.0.1:0"\ndatagram = "127.0.0.1:0"\n'
        f'[state]\nfile = "{path.parent / "state.json"}"\n'
        f'[ingest]\nlisten = ["udp:127.0.0.1:0"]\n'
        f"{extra}{subs}"
    )
    return path


class Load:
    """Two kinds of load while the test signals the engine: MI raises answered one
    by one (each OK'd number must reach every subscriber), and a stream of ingest
    datagrams that keeps the worker's ring busy (no reply to check: every
    subscriber must get the same ones)."""

    def __init__(self, mi: str, ingest: tuple[str, int]) -> None:
        self.mi = mi
        self.ingest = ingest
        self.ok: list[int] = []
        self.bulk_sent = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._raise, daemon=True),
            threading.Thread(target=self._bulk, daemon=True),
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _raise(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 200_000:
            n += 1
            try:
                result = call(self.mi, "raise_event", ["E_LOAD", json.dumps({"n": n})], timeout=2)
            except (MIClientError, MIReplyError, OSError):
                continue  # stopping: no answer, or refused
            if result == "OK":
                self.ok.append(n)

    def _bulk(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            n = 0
            while not self._stop.is_set() and n < 2_000_000:
                n += 1
                body = b'{"jsonrpc":"2.0","method":"E_BULK","params":{"n":%d}}' % n
                with suppress(OSError):
                    sock.sendto(body, self.ingest)
                if n % 100 == 0:
                    time.sleep(0.01)  # a stream (<10k/s), not a flood of the ingest socket
            self.bulk_sent = n


def numbers(rx: Receiver, method: str) -> list[int]:
    out = []
    for data in rx.datagrams:
        msg = json.loads(data)
        if msg["method"] == method:
            out.append(msg["params"]["n"])
    return out


def check_delivery(load: Load, rxs: list[Receiver]) -> None:
    """Every OK'd raise at every subscriber, once; the same bulk events at each."""
    for rx in rxs:
        rx.quiet(expect=len(load.ok))
    bulk = sorted(numbers(rxs[0], "E_BULK"))
    assert bulk, "the bulk load did not reach the engine"
    for rx in rxs:
        got = numbers(rx, "E_LOAD")
        assert len(got) == len(set(got)), "a raise was delivered twice"
        missing = set(load.ok) - set(got)
        assert not missing, f"{len(missing)} raise(s) answered OK never arrived"
        assert sorted(numbers(rx, "E_BULK")) == bulk, "subscribers got different events"


@contextmanager
def receivers(count: int) -> Iterator[list[Receiver]]:
    made = [udp_receiver() for _ in range(count)]
    try:
        yield made
    finally:
        for rx in made:
            rx.close()


def ingest_address(run: RunProc) -> tuple[str, int]:
    m = re.search(r"ingest udp:([\d.]+):(\d+)", run.ready)
    assert m, run.ready
    return m.group(1), int(m.group(2))


def scrape(run: RunProc) -> dict[str, float]:
    assert run.http
    url = run.http.removesuffix("/mi") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


def check_identity(samples: dict[str, float]) -> None:
    """SPEC section 5, from an idle engine's exposition (exact there)."""
    p = "event_datagram_"
    raised = total(samples, p + "events_raised_total")
    assert raised > 0
    assert raised == (
        total(samples, p + "oversize_rejections_total")
        + total(samples, p + "drops_total")
        + total(samples, p + "events_queued_total")
    )
    queued = total(samples, p + "pairs_queued_total")
    assert queued == (
        total(samples, p + "pairs_sent_total")
        + total(samples, p + "pairs_failed_total")
        + total(samples, p + "pairs_stale_total")
        + total(samples, p + "pairs_in_ring")
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_drains_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    instance = unique_instance("grp")
    with receivers(SUBSCRIBERS) as rxs, processes() as procs:
        cfg = write_config(tmp_path / "c.toml", instance, rxs)
        run = RunProc("--config", str(cfg), new_session=True)
        procs.append(run)
        assert run.udp
        with Load(run.udp, ingest_address(run)) as load:
            eventually(lambda: len(load.ok) >= 300, 60, "300 raises under load")
            os.killpg(run.popen.pid, sig)  # what systemd's KillMode=control-group does
            code = run.stop(timeout=60)
        assert code == 0, run.stderr
        assert " ERROR " not in run.stderr and "killed" not in run.stderr, run.stderr
        check_delivery(load, rxs)
        assert not list_segments(instance)
        assert not (tmp_path / "run" / f"{instance}.lock").exists()  # removed on a clean exit


def test_sighup_reloads_under_load_and_a_bad_config_keeps_the_running_one(
    tmp_path: Path,
) -> None:
    instance = unique_instance("hup")
    with receivers(SUBSCRIBERS + 1) as all_rxs, processes() as procs:
        rxs, late = all_rxs[:SUBSCRIBERS], all_rxs[SUBSCRIBERS]
        cfg = write_config(tmp_path / "c.toml", instance, rxs)
        run = RunProc("--config", str(cfg), new_session=True)
        procs.append(run)
        assert run.udp and run.http
        before = scrape(run)
        assert total(before, "event_datagram_config_last_reload_successful") == 1
        started = total(before, "event_datagram_config_last_reload_success_timestamp_seconds")
        with Load(run.udp, ingest_address(run)) as load:
            eventually(lambda: len(load.ok) >= 200, 60, "200 raises under load")
            # A good config: one more event, one more subscriber, a lower log level, and
            # a worker count that needs a restart (named, not applied).
            write_config(
                cfg,
                instance,
                [*rxs, late],
                events=("E_LOAD", "E_BULK", "E_NEW"),
                extra='[log]\nlevel = "warning"\n',
            )
            text = cfg.read_text().replace("workers = 1", "workers = 2")
            cfg.write_text(text)
            os.kill(run.popen.pid, signal.SIGHUP)
            run.wait_err(r"reloaded the config from")
            restart = run.wait_err(r"need a restart and are not applied: (.*)")
            assert restart.group(1) == "engine.workers"
            ok_at_reload = len(load.ok)
            eventually(lambda: len(load.ok) >= ok_at_reload + 200, 60, "raises after the reload")
            cfg.write_text(text + "[engine\n")  # does not load
            os.kill(run.popen.pid, signal.SIGHUP)
            run.wait_err(r"reload failed, the running config stays: config error")
            ok_at_failure = len(load.ok)
            eventually(lambda: len(load.ok) >= ok_at_failure + 200, 60, "raises after it")
        after = scrape(run)
        assert total(after, "event_datagram_config_last_reload_successful") == 0
        last = total(after, "event_datagram_config_last_reload_success_timestamp_seconds")
        assert last > started  # the good reload
        events = call(run.udp, "events_list", [])
        assert [e["name"] for e in events["Events"]] == ["E_LOAD", "E_BULK", "E_NEW"]
        assert total(after, "event_datagram_workers_alive") == 1  # not restarted
        eventually(lambda: total(scrape(run), "event_datagram_pairs_in_ring") == 0, 30, "idle")
        final = scrape(run)
        check_identity(final)
        check_delivery(load, rxs)
        # The subscriber the reload added gets what was raised after it.
        got = set(numbers(late, "E_LOAD"))
        assert got and set(load.ok[ok_at_reload:]) <= got
        assert run.stop() == 0, run.stderr
        # The new level applied first: the reload's own INFO lines are not written.
        assert "events added" not in run.stderr, run.stderr
