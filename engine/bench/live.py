"""The bench's live parts: the progress line, the metrics scraper, and what one
round measures (CPU snapshots, the per-round record)."""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from engine.bench.common import cpu_seconds, net_counters, system_cpu
from engine.bench.receivers import RoundReport
from engine.errors import EngineError
from engine.producer import Engine
from engine.shm.segment import list_segments, unlink_name
from engine.statistics import EngineStatistics


class Progress:
    """The live line on stderr: phase, rounds done, the receivers' current rate."""

    def __init__(self, enabled: bool, received: Callable[[], int]) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.received = received
        self.phase = "starting"
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.tty:
            self._thread = threading.Thread(
                target=self._run, name="edg-bench-progress", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        last_n, last_t = self.received(), time.monotonic()
        while not self._stop.wait(0.5):
            n, t = self.received(), time.monotonic()
            rate = (n - last_n) / (t - last_t) if t > last_t else 0.0
            last_n, last_t = n, t
            line = (
                f"[bench {t - self.started:5.1f}s] {self.done}/{self.total} rounds | "
                f"{self.phase} | receiving {rate / 1e3:,.0f}k dg/s"
            )
            sys.stderr.write("\r" + line.ljust(100)[:118])
            sys.stderr.flush()

    def note(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 118 + "\r" + line + "\n")
        elif self.enabled:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            sys.stderr.write("\r" + " " * 118 + "\r")
            sys.stderr.flush()


PAIRS_IN_RING: Final = re.compile(rb"^event_datagram_pairs_in_ring\{[^}]*\} (\S+)$", re.MULTILINE)


class Scraper:
    """Scrapes engine.metrics.exposition(engine) once per second during engine rounds,
    as Prometheus would scrape `run` (skipped, and said so, where it does not exist).
    Each scrape also gives the round's backlog: the datagrams waiting in the rings
    (`event_datagram_pairs_in_ring`, all workers), whose peak the round reports."""

    def __init__(self) -> None:
        self.exposition: Callable[[Engine], tuple[bytes, str]] | None = None
        self.note = ""
        try:
            from engine import metrics

            self.exposition = getattr(metrics, "exposition", None)
            if self.exposition is None:
                self.note = "engine.metrics has no exposition(): scraping skipped"
        except ImportError as exc:
            self.note = f"engine.metrics not available ({exc}): scraping skipped"
        self.scrapes = 0
        self.seconds = 0.0
        self.bytes = 0
        self.errors: list[str] = []
        self.round_times: list[float] = []
        self.round_peak_pending = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, engine: Engine) -> None:
        if self.exposition is None:
            return
        self._stop.clear()
        self.round_times = []
        self.round_peak_pending = 0
        self._thread = threading.Thread(target=self._run, args=(engine,), daemon=True)
        self._thread.start()

    def _run(self, engine: Engine) -> None:
        assert self.exposition is not None
        while not self._stop.wait(1.0):
            t = time.perf_counter()
            try:
                body, _ctype = self.exposition(engine)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            elapsed = time.perf_counter() - t
            self.round_times.append(elapsed)
            self.seconds += elapsed
            self.scrapes += 1
            self.bytes = len(body)
            with contextlib.suppress(ValueError):
                pending = sum(float(v) for v in PAIRS_IN_RING.findall(body))
                self.round_peak_pending = max(self.round_peak_pending, int(pending))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def round_summary(self) -> dict[str, Any]:
        """This round's scrapes: count, mean and max wall time (GIL waits included)."""
        times = self.round_times
        return {
            "scrapes": len(times),
            "mean_s": sum(times) / len(times) if times else None,
            "max_s": max(times) if times else None,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "available": self.exposition is not None,
            "note": self.note,
            "scrapes": self.scrapes,
            "mean_scrape_s": self.seconds / self.scrapes if self.scrapes else None,
            "exposition_bytes": self.bytes,
            "errors": self.errors[:5],
        }


IDLE_CORES: Final = 0.15
DRAIN_STALL_S: Final = 10.0  # a ring whose read position stands still this long: stuck


def wait_idle(max_wait_s: float, sample_s: float = 0.5) -> dict[str, Any]:
    """Sample the machine's busy CPU every `sample_s` until it is under IDLE_CORES
    (the bench's own processes are idle between rounds), for at most `max_wait_s`."""
    start = time.monotonic()
    while True:
        before = system_cpu()["busy"]
        time.sleep(sample_s)
        busy = (system_cpu()["busy"] - before) / sample_s
        waited = time.monotonic() - start
        if busy < IDLE_CORES or waited >= max_wait_s:
            return {"waited_s": waited, "busy_cores": busy, "idle": busy < IDLE_CORES}


def affinity(pid: int) -> list[int] | None:
    import psutil

    try:
        return sorted(psutil.Process(pid).cpu_affinity())
    except (psutil.Error, OSError, AttributeError):
        return None


def snapshot(pids: dict[str, list[int]], others: list[int]) -> dict[str, Any]:
    """CPU seconds of each role's processes, of our other processes, of the machine."""
    return {
        "cpu": {role: [cpu_seconds(p) or 0.0 for p in ps] for role, ps in pids.items()},
        "others": sum(cpu_seconds(p) or 0.0 for p in others),
        "system": system_cpu(),
        "net": net_counters(),
        "ns": time.monotonic_ns(),
    }


def per(n: float, d: float) -> float:
    return n / d if d > 0 else 0.0


def round_record(
    number: int,
    contender: str,
    report: RoundReport,
    before: dict[str, Any],
    after: dict[str, Any],
    t0: int,
    t_raised: int,
    t_sent: int,
    events: int,
    sent: int,
    failures: dict[str, int],
) -> dict[str, Any]:
    received = report.total("received")
    window = max(report.last_ns, t_sent) - t0
    cpu: dict[str, float] = {}
    detail: dict[str, list[float]] = {}
    for role, values in after["cpu"].items():
        deltas = [b - a for a, b in zip(before["cpu"][role], values, strict=True)]
        detail[role] = deltas
        cpu[role] = sum(deltas)
    per_dg = {
        role: per(1e6 * v, received if role == "receivers" else sent) for role, v in cpu.items()
    }
    wall = (after["ns"] - before["ns"]) / 1e9
    sys_delta = {k: after["system"][k] - before["system"][k] for k in after["system"]}
    net_delta = {f"machine_{k}": after["net"][k] - before["net"][k] for k in after["net"]}
    ours = sum(cpu.values()) + after["others"] - before["others"]
    # Softirq work (loopback delivery) is charged to the process it interrupted, so
    # it is in `ours` already; what remains is other processes (and ksoftirqd).
    foreign = max(0.0, sys_delta["busy"] - ours)
    overflow = receiver_overflow(report, failures)
    return {
        "round": number,
        "contender": contender,
        "sending_s": (t_raised - t0) / 1e9,
        "window_s": window / 1e9,
        "events_accepted_per_s": per(events, (t_raised - t0) / 1e9),
        "datagrams_sent": sent,
        "datagrams_sent_per_s": per(sent, (t_sent - t0) / 1e9),
        "datagrams_received": received,
        "datagrams_received_per_s": per(received, window / 1e9),
        "loss": sent - received,
        "duplicates": report.total("duplicates"),
        "invalid": report.total("invalid"),
        "truncated": report.total("truncated"),
        "stale": report.total("stale"),
        "bytes_received": report.total("bytes"),
        "send_failures": failures,
        **overflow,
        "loss_unexplained": sent - received - overflow["receiver_kernel_drops"],
        "receiver_errors": report.errors,
        "cpu_s": cpu,
        "cpu_s_per_process": detail,
        "cpu_us_per_datagram": per_dg,
        "datagrams_per_cpu_s_all_processes": per(received, sum(cpu.values())),
        "system": {
            "busy_cores": per(sys_delta["busy"], wall),
            "softirq_cores": per(sys_delta["softirq"], wall),
            "foreign_cores": per(foreign, wall),
            "foreign_cpu_s": foreign,
            "steal_cores": per(sys_delta["steal"], wall),
            **net_delta,
        },
        "subscribers": [
            {
                k: s.get(k, 0)
                for k in ("socket", "received", "duplicates", "invalid", "stale", "kernel_drops")
            }
            for s in report.sockets
        ],
    }


def refused_by_receivers(failures: dict[str, int]) -> int:
    """Sends a full UNIX receiver refused (EAGAIN: its queue of net.unix.max_dgram_qlen
    datagrams was full): "unix:eagain", as the engine and the reference senders count
    them. A UDP EAGAIN is the sender's own (its send buffer), not the receiver's."""
    return sum(n for key, n in failures.items() if key.lower() == "unix:eagain")


def receiver_overflow(report: RoundReport, failures: dict[str, int]) -> dict[str, Any]:
    """Loss told apart: what the receivers' sockets could not take (the kernel's drops
    at each UDP socket, the sends a full UNIX socket refused) versus what the sender
    failed to send for its own reasons (`engine_loss`; engine rounds add their stale
    pairs). `loss_unexplained` is sent - received - kernel drops: 0 when every lost
    datagram was seen dropped at a receiver socket."""
    sent_failures = sum(failures.values())
    refused = refused_by_receivers(failures)
    kernel = report.total("kernel_drops") if report.sockets else 0
    return {
        "receiver_kernel_drops": kernel,
        "receiver_refused": refused,
        "receiver_overflow": kernel + refused,
        "engine_loss": sent_failures - refused,
        "limited_by": "receivers" if kernel + refused else "sender",
    }


def add_engine_loss(result: dict[str, Any], stats: EngineStatistics, subscribed: int) -> None:
    """An engine round's own loss, in datagrams: besides its failed sends, the pairs it
    dropped as stale (older than engine.max_delay_ms) and the events it turned away
    (ring_full) times the subscribers each would have gone to."""
    ring_full = stats.drops.get("ring_full", 0)
    result["engine_loss"] += stats.pairs_stale + ring_full * subscribed
    result["engine_events_dropped"] = ring_full


def wait_drained(engine: Engine, cap_s: float, stall_s: float = DRAIN_STALL_S) -> int:
    """Wait until every worker has sent everything in its ring; return that time (ns).

    However long the backlog (with 1,000 subscribers an event is 1,000 datagrams),
    this waits while the workers make progress; it gives up when no ring's read
    position moved for `stall_s`, or after `cap_s` in all."""
    rings = engine.supervisor.rings
    start = time.monotonic()
    last = [r.read_pos for r in rings]
    moved = start
    while True:
        now = time.monotonic()
        positions = [r.read_pos for r in rings]
        if all(p == r.write_pos for p, r in zip(positions, rings, strict=True)):
            return time.monotonic_ns()
        if engine.failure:
            raise EngineError(engine.failure)
        if positions != last:
            last, moved = positions, now
        left = sum(r.write_pos - p for p, r in zip(positions, rings, strict=True))
        if now - moved >= stall_s:
            raise EngineError(
                f"workers did not drain their rings: no progress for {stall_s:.0f} s "
                f"({left:,} bytes left)"
            )
        if now - start >= cap_s:
            raise EngineError(
                f"workers did not drain their rings within {cap_s:.0f} s ({left:,} bytes left)"
            )
        time.sleep(0.002)


def stop_engine(engine: Engine, instance: str) -> None:
    with contextlib.suppress(Exception):
        engine.stop(drain_timeout_s=2.0)
    for name in list_segments(instance):
        unlink_name(name)


def send_failures(stats: EngineStatistics) -> dict[str, int]:
    """Failed sends over all workers as {"transport:reason": n}, nonzero ones only."""
    failures: dict[str, int] = {}
    for w in stats.workers:
        for (transport, reason), n in w.failures.items():
            if n:
                key = f"{transport}:{reason}"
                failures[key] = failures.get(key, 0) + n
    return failures
