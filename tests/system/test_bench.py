"""`event-datagram bench`: a tiny real run through the CLI, its JSON checked for
completeness and consistency (never for speed), and its clean-up checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.cli import main as cli
from engine.shm.segment import list_segments

TINY = [
    "--duration", "1", "--rounds", "2", "--subscribers", "2", "--latency-duration", "1",
    "--idle-latency-duration", "1", "--idle-cpu-duration", "1",
    "--ring-bytes", str(1 << 20), "--quiet",
]  # fmt: skip
LATENCY_KEYS = {
    "p50", "p90", "p99", "p999", "max", "mean", "samples", "rate_events_per_s", "duration_s",
    "cdf",
}  # fmt: skip

STABLE_KEYS = [
    ("engine", "datagrams_received_per_s"),
    ("baseline", "datagrams_received_per_s"),
    ("ratio_median",),
    ("loss", "engine"),
    ("loss", "baseline"),
    ("loss", "latency_phase"),
    ("drops", "engine"),
    ("latency_s", "p50"),
    ("latency_s", "p99"),
    ("latency_s", "p999"),
    ("idle_latency_s", "p50"),
    ("idle_latency_s", "p99"),
    ("idle_cpu_percent",),
    ("idle_latency", "idle_cpu", "window_s"),
    ("idle_latency", "events_after_sleep"),
    ("idle_latency", "latency_after_sleep_s"),
    ("idle_latency_c_s", "status"),
    ("idle_latency_c_ratio_p50",),
    ("backlog", "max_pending_datagrams"),
    ("backlog", "pending_at_end_of_raising"),
    ("backlog", "ring_full"),
    ("targets", "idle_cpu_percent", "met"),
    ("targets", "idle_latency_p99_s", "met"),
    ("targets", "idle_first_datagram_vs_c_p50", "met"),
    ("cpu_s", "engine", "producer"),
    ("cpu_s", "engine", "workers"),
    ("cpu_s", "engine", "receivers"),
    ("cpu_s", "baseline", "sender"),
    ("rss_bytes", "producer"),
    ("rss_bytes", "workers"),
    ("rss_bytes", "receivers"),
    ("rss_bytes", "sender"),
    ("rounds",),
    ("machine", "cores"),
    ("machine", "kernel"),
    ("machine", "python"),
    ("settings", "payload_bytes"),
    ("sysctl", "net.core.rmem_max"),
    ("sysctl", "net.unix.max_dgram_qlen"),
    ("sysctl", "receive_buffer", "method"),
    ("identity_errors",),
    ("oversize",),
    ("metrics", "available"),
]
ROUND_KEYS = (
    "round", "contender", "events_accepted_per_s", "datagrams_sent", "datagrams_sent_per_s",
    "datagrams_received", "datagrams_received_per_s", "loss", "duplicates", "invalid",
    "send_failures", "drops", "cpu_s", "cpu_us_per_datagram", "system", "identity_errors",
)  # fmt: skip


def dig(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = doc
    for key in path:
        assert isinstance(node, dict) and key in node, f"missing key {'.'.join(path)}"
        node = node[key]
    return node


def check_result(doc: dict[str, Any], transport: str, subscribers: int) -> None:
    for path in STABLE_KEYS:
        dig(doc, path)
    assert doc["interrupted"] is None and doc["error"] is None
    assert doc["identity_errors"] == []
    rounds = doc["rounds"]
    assert [r["contender"] for r in rounds] == ["engine", "baseline", "ceiling"] * 2
    assert [r["round"] for r in rounds] == [1, 1, 1, 2, 2, 2]
    for r in [*rounds, doc["latency"], doc["idle_latency"]]:
        for key in ROUND_KEYS:
            assert key in r, f"round {r['round']} {r['contender']}: no {key}"
        assert 0 <= r["datagrams_received"] <= r["datagrams_sent"], r
        assert r["loss"] == r["datagrams_sent"] - r["datagrams_received"]
        assert r["duplicates"] == 0 and r["invalid"] == 0 and r["truncated"] == 0
        assert r["identity_errors"] == []
        assert len(r["subscribers"]) == subscribers
        assert sum(s["received"] for s in r["subscribers"]) == r["datagrams_received"]
        check_loss_split(r)
        if r["contender"] in ("engine", "latency", "idle"):
            # The rings were drained: every queued pair was sent, failed or stale.
            handled = r["datagrams_sent"] + sum(r["send_failures"].values()) + r["pairs_stale"]
            assert r["pairs_queued"] == handled
            assert r["pairs_stale"] == 0  # engine.max_delay_ms is off by default
            drops = r["drops"]["ring_full"] + r["drops"]["no_subscribers"]
            assert r["events"] == r["events_raised"]
            assert r["events"] == drops + r["events_queued"] + r["oversize"]
            assert set(r["cpu_s"]) == {"producer", "workers", "receivers"}
    ratios = doc["ratios"]
    assert len(ratios) == 2 and doc["ratio_median"] is not None
    lat = doc["latency_s"]
    assert lat["samples"] == doc["latency"]["datagrams_received"]
    if lat["samples"]:
        assert lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    check_idle(doc, subscribers)
    assert doc["settings"]["transport"] == transport
    if len(doc["machine"]["usable_cpus"]) > 1:  # the engine pins its workers
        assert all(cpus for cpus in doc["settings"]["cpu_plan"]["workers"])
    assert doc["machine"]["cores"] == os.cpu_count()


def check_loss_split(r: dict[str, Any]) -> None:
    """Loss is told apart: the receivers' overflow (kernel drops at their sockets, sends
    a full UNIX socket refused) versus what the sender itself failed to send."""
    drops = sum(s["kernel_drops"] for s in r["subscribers"])
    assert r["receiver_kernel_drops"] == drops >= 0
    assert r["receiver_overflow"] == drops + r["receiver_refused"]
    assert r["loss_unexplained"] == r["loss"] - drops
    assert r["receiver_refused"] == r["send_failures"].get("unix:eagain", 0)
    assert r["engine_loss"] + r["receiver_refused"] >= sum(r["send_failures"].values())
    assert r["limited_by"] == ("receivers" if r["receiver_overflow"] else "sender")


def check_idle(doc: dict[str, Any], subscribers: int) -> None:
    """The idle phase: shaped like the latency phase, a CPU figure per worker, and the
    first event after the quiet period found a worker asleep."""
    idle, lat = doc["idle_latency"], doc["idle_latency_s"]
    assert set(lat) == LATENCY_KEYS == set(doc["latency_s"])
    assert idle["contender"] == "idle" and idle["subscribed"] == min(4, subscribers)
    assert lat["samples"] == idle["datagrams_received"] > 0
    assert lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert lat["rate_events_per_s"] == 20.0 and lat["duration_s"] == 1.0
    assert idle["events"] == idle["events_raised"] > 0
    assert 1 <= idle["events_after_sleep"] <= idle["events"]
    woken, polling = idle["latency_after_sleep_s"], idle["latency_while_polling_s"]
    assert set(woken) == set(polling) == LATENCY_KEYS
    assert woken["samples"] + polling["samples"] == lat["samples"]
    workers = doc["settings"]["workers_effective"]
    cpu = doc["idle_cpu_percent"]
    assert sorted(cpu) == [str(k) for k in range(workers)]
    assert all(isinstance(v, float) and 0 <= v < 100 for v in cpu.values()), cpu
    assert idle["idle_cpu"]["window_s"] >= 1.0
    assert all(n >= 0 for n in idle["idle_cpu"]["sleeps"].values())
    first = doc["idle_latency_first_s"]
    ratios = {
        "idle_latency_c_ratio_first_p50": doc["idle_latency_c_s"],
        "idle_latency_py_ratio_first_p50": doc["idle_latency_py_s"],
    }
    for key, chain in ratios.items():
        if chain.get("status") == "ok":
            assert doc[key] == first["p50"] / chain["p50"], key
        else:
            assert doc[key] is None, key
    targets = doc["targets"]
    assert targets["idle_cpu_percent"]["value"] == max(cpu.values())
    assert targets["idle_cpu_percent"]["target"] == 0.1
    assert targets["idle_latency_p99_s"] == {
        "value": lat["p99"],
        "target": 200e-6,
        "met": lat["p99"] < 200e-6,
    }
    first_vs_c = doc["idle_latency_c_ratio_first_p50"]
    assert targets["idle_first_datagram_vs_c_p50"] == {
        "value": first_vs_c,
        "target": 1.5,
        "met": first_vs_c is not None and first_vs_c <= 1.5,
    }


def check_clean(doc: dict[str, Any]) -> None:
    for instance in doc["settings"]["instances"]:
        assert list_segments(instance) == [], f"segments of {instance} left behind"
    assert not Path(doc["settings"]["socket_dir"]).exists(), "socket directory left behind"
    procs = doc["settings"]["processes"]
    for pid in [*procs["receivers"], procs["sender"]]:
        assert not alive(pid), f"bench child {pid} left running"
    for r in doc["rounds"]:
        for pid in r.get("worker_pids", []):
            assert not alive(pid), f"worker {pid} left running"


def alive(pid: int, wait_s: float = 3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.05)
    return True


def test_udp_run_through_the_cli_writes_complete_consistent_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", *TINY, "--json", str(out)]
    plot = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(plot)]
    except ImportError:
        plot = None  # type: ignore[assignment]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    check_result(doc, "udp", 2)
    check_clean(doc)
    assert doc["loss"]["latency_phase"] is not None
    table = capsys.readouterr().out
    assert "datagrams/s received" in table and "engine / baseline" in table
    assert "idle: worker CPU" in table and "idle latency raise->receive" in table
    assert "idle_cpu_percent" in table and "idle_latency_p99_s" in table
    assert "idle_first_datagram_vs_c_p50" in table
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_receiver_that_overflows_is_blamed_not_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Receive buffers of 4 KiB hold a handful of datagrams; a worker's sendmmsg of a
    batch overflows them whatever the receivers cost. Those drops are the receivers'
    (counted by the kernel at their sockets); the engine, which lost nothing, reports
    engine loss 0, and the headline is its own sending figure."""
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--duration", "1", "--rounds", "1", "--subscribers", "2",
        "--latency-duration", "0", "--idle-latency-duration", "0", "--idle-cpu-duration", "0",
        "--rcvbuf-bytes", "4096", "--quiet", "--json", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    engine = next(r for r in doc["rounds"] if r["contender"] == "engine")
    check_loss_split(engine)
    assert engine["send_failures"] == {} and engine["engine_loss"] == 0
    assert engine["receiver_kernel_drops"] > 0, "4 KiB receive buffers overflowed nowhere"
    # Every datagram lost was seen dropped: at a receiver socket, or in the machine's
    # loopback backlog (not a socket's, so counted apart).
    assert engine["loss_unexplained"] <= engine["system"]["machine_backlog_drops"]
    assert all(s["kernel_drops"] > 0 for s in engine["subscribers"])
    head = doc["headline"]
    assert head["engine_loss"] == 0 == doc["engine_loss"]["engine"]
    assert head["receiver_overflow"] == engine["receiver_overflow"]
    assert doc["receiver_overflow"]["engine"]["kernel_drops"] == engine["receiver_kernel_drops"]
    assert head["limited_by"] == "receivers"
    assert head["datagrams_sent_per_s"] == engine["datagrams_sent_per_s"]
    us = engine["cpu_us_per_datagram"]
    assert head["cpu_us_per_datagram"]["workers"] == us["workers"]
    ceiling = next(r for r in doc["rounds"] if r["contender"] == "ceiling")
    fraction = head["fraction_of_ceiling_efficiency"]["workers"]
    assert fraction == pytest.approx(ceiling["cpu_us_per_datagram"]["sender"] / us["workers"])
    table = capsys.readouterr().out
    assert "engine loss 0; receiver overflow" in table and "the receivers limit" in table


def test_unix_run_reports_the_qlen_limit_and_the_missing_plot_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were missing
    out = tmp_path / "bench.json"
    argv = ["bench", *TINY, "--transport", "unix", "--json", str(out), "--plot", "x.png"]
    assert cli.main(argv) == 3  # done, but no plot
    assert "pip install 'event-datagram[bench]'" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    check_result(doc, "unix", 2)
    check_clean(doc)
    qlen = doc["sysctl"]["net.unix.max_dgram_qlen"]
    if qlen is not None and qlen < 1024:
        assert any("net.unix.max_dgram_qlen" in w for w in doc["warnings"])
        assert doc["sysctl"]["limits"][-1]["sysctl"] == "net.unix.max_dgram_qlen"
    assert not Path("x.png").exists()


def test_sigterm_stops_cleans_up_and_writes_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "bench", "--duration", "10", "--rounds", "1",
         "--subscribers", "2", "--quiet", "--json", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        prefix = f"edg-bench{proc.pid}r"  # the engine round's segments
        deadline = time.monotonic() + 20
        engine_seen = False
        while time.monotonic() < deadline and not engine_seen:  # wait for the engine round
            engine_seen = any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
            time.sleep(0.05)
        assert engine_seen, "the engine round never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    doc = json.loads(out.read_text())
    assert doc["interrupted"] == "SIGTERM"
    check_clean(doc)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"edg-bench{proc.pid}r")]


def test_a_thousand_subscribers_complete_with_the_default_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1,000 UDP subscribers: every round finishes (the engine's backlog bound keeps
    the drain short), the identity holds, and every datagram received is checked."""
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--subscribers", "1000", "--rounds", "1", "--duration", "1",
        "--latency-duration", "0", "--idle-latency-duration", "0", "--idle-cpu-duration", "0",
        "--quiet", "--json", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    assert cli.main(argv) == 0
    assert time.monotonic() - started < 60
    doc = json.loads(out.read_text())
    assert doc["error"] is None and doc["interrupted"] is None
    assert doc["identity_errors"] == []
    assert [r["contender"] for r in doc["rounds"]] == ["engine", "baseline", "ceiling"]
    for r in doc["rounds"]:
        assert r["datagrams_received"] > 0, r["contender"]
        assert r["loss"] == r["datagrams_sent"] - r["datagrams_received"] >= 0
        assert r["duplicates"] == r["invalid"] == r["truncated"] == 0
        assert len(r["subscribers"]) == 1000
        assert sum(s["received"] for s in r["subscribers"]) == r["datagrams_received"]
    engine = doc["rounds"][0]
    assert engine["subscribed"] == 1000 and engine["identity_errors"] == []
    handled = engine["datagrams_sent"] + sum(engine["send_failures"].values())
    assert engine["pairs_queued"] == handled + engine["pairs_stale"]
    backlog = doc["backlog"]
    assert backlog["max_pending_datagrams"] == 1_000_000
    ring_full = engine["drops"]["ring_full"]
    assert backlog["ring_full"] == ring_full == doc["drops"]["engine"]["ring_full"]
    assert 0 <= backlog["pending_at_end_of_raising"] <= backlog["peak_pending_sampled"]
    assert backlog["peak_pending_sampled"] <= 1_000_000 * doc["settings"]["workers_effective"]
    assert doc["idle_latency_s"] == {} and doc["idle_cpu_percent"] == {}
    assert doc["idle_latency"] is None
    check_clean(doc)
    assert "backlog: bound 1,000,000" in capsys.readouterr().out


INGEST_KEYS = {
    "datagrams_received_per_s", "datagrams_sent_per_s", "events_accepted_per_s",
    "datagrams_received", "datagrams_sent", "loss", "cpu_s", "cpu_us_per_datagram",
    "events_ingested_per_s", "events_ingested", "datagrams_emitted", "kernel_drops",
    "cpu_us_per_event", "rejected",
}  # fmt: skip


def test_source_both_interleaves_ingest_rounds_and_reports_them(tmp_path: Path) -> None:
    """--source both: engine, ingest, baseline, ceiling per round; the ingest block is
    complete and consistent, its rounds' accounting identity (socket included) holds."""
    out = tmp_path / "both.json"
    argv = [
        "bench", "--source", "both", "--rounds", "1", "--duration", "1", "--subscribers", "2",
        "--latency-duration", "0", "--idle-latency-duration", "0", "--idle-cpu-duration", "0",
        "--ring-bytes", str(1 << 20), "--quiet", "--json", str(out), "--ingest-rate", "5000",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["error"] is None and doc["identity_errors"] == []
    assert [r["contender"] for r in doc["rounds"]] == ["engine", "ingest", "baseline", "ceiling"]
    (e,) = [r for r in doc["rounds"] if r["contender"] == "engine"]
    assert e["rate_target"] is None  # --ingest-rate paces the emitter only
    (cost,) = doc["ratios_ingest_vs_api"]
    assert cost["producer_us_per_event_ingest"] > 0 and cost["producer_us_per_event_api"] > 0
    assert doc["ingest_cost_vs_api_median"] == cost["producer_cost_ratio"] > 0
    ingest = doc["ingest"]
    assert set(ingest) >= INGEST_KEYS, INGEST_KEYS - set(ingest)
    assert set(doc["engine"]) <= set(ingest)  # the same keys as the API contender, and more
    assert ingest["events_ingested_per_s"] > 0
    assert 0 < ingest["events_ingested"] <= ingest["datagrams_emitted"]
    assert ingest["events_ingested"] + ingest["kernel_drops"] <= ingest["datagrams_emitted"]
    assert ingest["rejected"] == {}
    assert 0 <= ingest["datagrams_received"] <= ingest["datagrams_sent"]
    assert set(ingest["cpu_us_per_event"]) == {"producer", "workers", "emitter", "receivers"}
    assert all(v > 0 for v in ingest["cpu_us_per_event"].values()), ingest["cpu_us_per_event"]
    assert doc["ratio_ingest_vs_api_median"] is not None
    (g,) = [r for r in doc["rounds"] if r["contender"] == "ingest"]
    assert g["rate_target"] == 5000 and ingest["datagrams_emitted"] <= 5000 * 1.2
    assert g["identity_errors"] == [] and g["duplicates"] == 0 and g["invalid"] == 0
    assert g["events"] == g["ingest"]["events_raised"] == g["ingest"]["events_ingested"]
    # Each ingested event to both subscribers, unless a full ring turned it away (a
    # 1 MiB ring on a busy machine) or a send failed: both are counted.
    handled = g["datagrams_sent"] + sum(g["send_failures"].values())
    assert handled == 2 * (g["events"] - sum(g["drops"].values())), (g["drops"], g["send_failures"])
    check_clean(doc)
