"""What scraping costs: throughput with `/metrics` scraped every second vs not at all.

    python -m engine.bench.probes.metrics_overhead [--rounds 16] [--seconds 2] [--subscribers 4]

One engine, one run, interleaved rounds (off, on, off, on, ...) so drift of a
shared machine hits both modes alike. In an "on" round a thread calls
`exposition()` every `--interval` seconds, as an HTTP scrape would. Each round
raises events as fast as the producer can (the drop policy: it never waits)
to UDP subscribers on loopback, then waits for the rings to drain. Reported:
the median events/s accepted and datagrams/s sent per mode, the median ratio of
each scraped round to its unscraped neighbours, and the cost of one exposition.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass

from engine.metrics import exposition
from engine.options import EngineOptions
from engine.producer import Engine


@dataclass(frozen=True, slots=True)
class Round:
    scraped: bool
    scrapes: int
    scrape_s: float  # wall time spent inside exposition() during the round
    events_per_s: float  # events accepted (queued) by the producer
    datagrams_per_s: float  # pairs sent by the workers, drain included


def _round(engine: Engine, seconds: float, interval: float | None) -> Round:
    stop = threading.Event()
    scrapes = 0
    scrape_s = 0.0

    def scrape() -> None:
        nonlocal scrapes, scrape_s
        while not stop.wait(interval):
            t0 = time.perf_counter()
            exposition(engine)
            scrape_s += time.perf_counter() - t0
            scrapes += 1

    scraper = threading.Thread(target=scrape, daemon=True) if interval else None
    before = engine.statistics()
    queued = 0
    start = time.perf_counter()
    if scraper:
        scraper.start()
    deadline = start + seconds
    params = {"ip": "192.168.2.11", "reason": "threshold", "count": 0}
    while time.perf_counter() < deadline:
        for _ in range(100):
            queued += engine.raise_event("E_BENCH", params).queued
    raised_for = time.perf_counter() - start
    while any(w.ring.used_bytes for w in engine.statistics().workers):
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    stop.set()
    if scraper:
        scraper.join()
    sent = engine.statistics().pairs_sent - before.pairs_sent
    return Round(bool(interval), scrapes, scrape_s, queued / raised_for, sent / elapsed)


def measure(
    rounds: int, seconds: float, subscribers: int, interval: float, workers: int
) -> tuple[list[Round], float]:
    """Interleaved rounds, and the mean seconds of one exposition() of this engine."""
    sinks = []
    for _ in range(subscribers):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))  # never read: the kernel drops what overflows
        sinks.append(sink)
    options = EngineOptions(instance=f"overhead{os.getpid()}", workers=workers)
    engine = Engine(options, events=["E_BENCH"])
    results = []
    try:
        engine.start()
        for sink in sinks:
            host, port = sink.getsockname()
            engine.subscribe("E_BENCH", f"udp:{host}:{port}")
        _round(engine, min(seconds, 0.5), None)  # warm-up, not counted
        for k in range(rounds):
            results.append(_round(engine, seconds, interval if k % 2 else None))
        t0 = time.perf_counter()
        for _ in range(20):
            exposition(engine)
        cost = (time.perf_counter() - t0) / 20
    finally:
        engine.stop()
        for sink in sinks:
            sink.close()
    return results, cost


def paired_ratio(values: list[float]) -> float:
    """Median over "on" rounds (odd k) of value / mean of its "off" neighbours."""
    ratios = []
    for k in range(1, len(values), 2):
        neighbours = [values[k - 1]] + ([values[k + 1]] if k + 1 < len(values) else [])
        ratios.append(values[k] / statistics.mean(neighbours))
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=16, help="rounds, alternating off/on")
    parser.add_argument("--seconds", type=float, default=2.0, help="raising time per round")
    parser.add_argument("--subscribers", type=int, default=4, help="UDP subscribers")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--workers", type=int, default=0, help="0 = CPUs - 1")
    args = parser.parse_args(argv)
    results, cost = measure(
        args.rounds, args.seconds, args.subscribers, args.interval, args.workers
    )
    print(f"{'round':>5} {'scraped':>8} {'scrapes':>8} {'events/s':>12} {'datagrams/s':>12}")
    for k, r in enumerate(results):
        print(
            f"{k:>5} {'yes' if r.scraped else 'no':>8} {r.scrapes:>8} "
            f"{r.events_per_s:>12,.0f} {r.datagrams_per_s:>12,.0f}"
        )
    for what in ("events_per_s", "datagrams_per_s"):
        a = statistics.median(getattr(r, what) for r in results if not r.scraped)
        b = statistics.median(getattr(r, what) for r in results if r.scraped)
        ratio = paired_ratio([getattr(r, what) for r in results])
        print(
            f"{what.replace('_per_s', '/s'):>12}: not scraped {a:,.0f}  scraped {b:,.0f}  "
            f"scraped/not (median of neighbour pairs) {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)"
        )
    on = [r for r in results if r.scraped]
    busy = sum(r.scrape_s for r in on)
    scrapes = max(1, sum(r.scrapes for r in on))
    print(
        f"exposition() under load: {busy / scrapes * 1e3:.1f} ms per scrape, "
        f"{busy / (len(on) * args.seconds) * 100:.2f}% of the scraped rounds' raising time "
        "(its engine.statistics() holds the producer lock)"
    )
    print(f"exposition() of the idle engine: {cost * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
