"""What routing costs and saves: groups and filters against plain subscribers.

    python -m engine.bench.probes.routing [--rounds 4] [--events 50000] [--modes plain,half,rr,hash]

One engine per mode, all started first, then interleaved rounds (plain, half,
rr, hash, plain, ...) so drift of a shared machine hits every mode alike. Each
mode has the same 4 (`--subscribers`) UDP sinks on loopback (never read: the kernel drops what
overflows, as for any slow subscriber):

- plain: 4 plain subscribers (4 datagrams per event);
- half: the same 4, two of them with a filter no event matches (2 datagrams);
- rr: the 4 as one ``virtual:ROUND-ROBIN`` group (1 datagram);
- hash: the 4 as one ``virtual:HASH(callid)`` group (1 datagram);
- filtered0: the 4 with a filter every event matches (4 datagrams, each event's
  params decoded once in the worker): the cost of a filter alone.

A round raises `--events` events with ``full_ring_policy = "wait"`` (nothing
drops) and waits until the workers have handled them all. Reported per mode:
the median of events/s handled (raised to last one handled), datagrams/s, and
CPU per event (the producer's and the workers' CPU time over the round, from
psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any, Final

import psutil

from engine.options import EngineOptions
from engine.producer import Engine

MODES: Final = ("plain", "half", "rr", "hash", "filtered0")


def _subscribe(engine: Engine, mode: str, sinks: list[str]) -> None:
    if mode in ("plain", "half", "filtered0"):
        for k, sink in enumerate(sinks):
            filt = None
            if mode == "half" and k % 2:
                filt = "kind=no-such-kind"
            elif mode == "filtered0":
                filt = "kind=bl*"
            engine.subscribe("E_BENCH", sink, None, filt)
    elif mode == "rr":
        engine.subscribe("E_BENCH", "virtual:ROUND-ROBIN " + " ".join(sinks), None)
    elif mode == "hash":
        engine.subscribe("E_BENCH", "virtual:HASH(callid) " + " ".join(sinks), None)
    else:
        raise ValueError(f"unknown mode {mode!r}")


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _round(engine: Engine, events: int) -> dict[str, float]:
    before = engine.statistics()
    pids = [os.getpid()] + [w.pid for w in before.workers if w.pid]
    cpu0 = _cpu(pids)
    params: dict[str, Any] = {"kind": "blocked", "ip": "192.168.2.11", "callid": ""}
    start = time.perf_counter()
    for n in range(events):
        params["callid"] = f"call-{n % 1000}@bench"
        engine.raise_event("E_BENCH", params)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # bounded: a stuck worker ends the round
        stats = engine.statistics()
        if all(w.pairs_in_ring == 0 for w in stats.workers):
            break
        time.sleep(0.0005)
    elapsed = time.perf_counter() - start
    cpu = _cpu(pids) - cpu0
    after = engine.statistics()
    sent = after.pairs_sent - before.pairs_sent
    failed = after.pairs_failed - before.pairs_failed
    return {
        "events_per_s": events / elapsed,
        "datagrams_per_s": (sent + failed) / elapsed,
        "cpu_us_per_event": cpu / events * 1e6,
    }


def measure(
    modes: list[str], rounds: int, events: int, workers: int, subscribers: int = 4
) -> dict[str, list[Any]]:
    sinks = []
    for _ in range(subscribers):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sinks.append(sink)
    texts = [f"udp:127.0.0.1:{s.getsockname()[1]}" for s in sinks]
    engines: dict[str, Engine] = {}
    results: dict[str, list[Any]] = {m: [] for m in modes}
    try:
        for mode in modes:
            options = EngineOptions(
                instance=f"routing{os.getpid()}{mode.replace('0', 'z')}",
                workers=workers,
                full_ring_policy="wait",
                full_ring_wait_ms=1000,
            )
            engine = engines[mode] = Engine(options, events=["E_BENCH"])
            engine.start()
            _subscribe(engine, mode, texts)
            _round(engine, min(events, 2000))  # warm-up, not counted
        for _ in range(rounds):
            for mode in modes:
                results[mode].append(_round(engines[mode], events))
        for engine in engines.values():
            engine.statistics().check_identity()
    finally:
        for engine in engines.values():
            engine.stop()
        for sink in sinks:
            sink.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.bench.probes.routing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode, interleaved")
    parser.add_argument("--events", type=int, default=50_000, help="events per round")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--subscribers", type=int, default=4, help="UDP sinks (default 4)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or min(args.rounds, args.events, args.subscribers) < 1:
        parser.error(f"--modes takes {', '.join(MODES)}; --rounds and --events at least 1")
    report(modes, args.rounds, args.events, args.workers, args.subscribers)


def report(
    modes: list[str],
    rounds: int,
    events: int,
    workers: int,
    subscribers: int,
    json_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Measure, print the table, write the medians as JSON (`json_path`); return them."""
    results = measure(modes, rounds, events, workers, subscribers)
    medians = {
        mode: {
            what: statistics.median(r[what] for r in results[mode])
            for what in ("events_per_s", "datagrams_per_s", "cpu_us_per_event")
        }
        for mode in modes
    }
    base = medians[modes[0]]["events_per_s"]
    versus = "vs " + modes[0]
    print(f"{'mode':>10} {'events/s':>10} {'datagrams/s':>12} {'CPU us/event':>13} {versus:>9}")
    for mode, m in medians.items():
        print(
            f"{mode:>10} {m['events_per_s']:>10,.0f} {m['datagrams_per_s']:>12,.0f} "
            f"{m['cpu_us_per_event']:>13.2f} {m['events_per_s'] / base:>9.2f}x"
        )
    if json_path:
        document = {"subscribers": subscribers, "events": events, "rounds": rounds}
        with open(json_path, "w") as out:
            json.dump({**document, "medians": medians, "rounds_by_mode": results}, out, indent=1)
    return medians


if __name__ == "__main__":
    main()
