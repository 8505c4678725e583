"""The issue 19 targets for hostile upstreams, measured (not a test: it takes a minute).

    python -m tests.helpers.hostile_soak [--seconds 60] [KIND ...]

For each kind, at once: a hostile MI (tests/helpers/hostile_mi.py) and a real
`event-datagram run` process with one [[upstream]] at it (events ["*"], expire 6:
refreshed every 2 s, the worst case). Over the run: the engine's log lines after
its ready line, its RSS (VmRSS, from the ready line to the end), and from
/metrics its upstream_up, errors by reason and refused events. Then the MI is told
to behave (SIGUSR1) and the seconds until upstream_up is 1 are reported (for the
kinds that can be up at all: 2,000 events do not fit in 256 slots).
Targets: at most 10 log lines a minute, up correct, errors still counted at the
end (the thread alive), RSS growth under 10 MB.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.helpers.mi import Proc

KINDS = {  # kind -> (hostile_mi mode, events, transport, can be up after SIGUSR1)
    "truncated": ("truncated", 3, "http", True),
    "garbage": ("garbage", 3, "http", True),
    "trickle": ("trickle", 3, "http", True),
    "huge": ("huge", 3, "http", True),
    "huge_chunked": ("huge_chunked", 3, "http", True),
    "udp_garbage": ("udp_garbage", 3, "udp", True),
    "events_2000": ("good", 2000, "http", False),
    "events_10000": ("good", 10000, "http", False),
    "renaming_2000": ("renaming", 2000, "http", False),
}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("event_datagram_upstream_"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("event_datagram_upstream_")] = float(value)
    return out


def soak(kind: str, seconds: float, tmp: Path, results: dict[str, dict[str, object]]) -> None:
    mode, events, transport, can_be_up = KINDS[kind]
    mi = Proc([sys.executable, "-m", "tests.helpers.hostile_mi", mode, str(events)])
    try:
        deadline = time.monotonic() + 20
        while not mi.out and time.monotonic() < deadline:
            time.sleep(0.05)
        http, udp = mi.out[0].decode().split()[1:3]
        target = http if transport == "http" else udp
        cfg = tmp / f"{kind}.toml"
        cfg.write_text(
            "events = []\n"
            f'[engine]\ninstance = "soak{kind.replace("_", "")}"\nworkers = 1\npin = false\n'
            f'runtime_dir = "{tmp / kind}"\n'
            '[mi]\nhttp = "127.0.0.1:0"\ndatagram = ""\n[state]\nenabled = false\n'
            '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n'
            f'[[upstream]]\nmi = "{target}"\nevents = ["*"]\nexpire = 6\n'
        )
        engine = Proc([sys.executable, "-m", "engine", "run", "--config", str(cfg)])
        try:
            ready = engine.wait_err(r"event-datagram ready: (.*)", 60).group(1)
            url = re.search(r"metrics (\S+?),", ready)
            assert url, ready
            before = len(engine.err)
            rss0 = rss_kib(engine.popen.pid)
            peak = rss0
            start = time.monotonic()
            samples = []
            while time.monotonic() - start < seconds:
                time.sleep(5)
                peak = max(peak, rss_kib(engine.popen.pid))
                samples.append(metrics(url.group(1)))
            lines = engine.err[before:]
            end = samples[-1]
            then = samples[max(0, len(samples) - 4)]  # 15 s before: a 10 s back-off + 1 s call
            errors_then = {k: v for k, v in then.items() if k.startswith("errors_total")}
            errors_now = {k: v for k, v in end.items() if k.startswith("errors_total")}
            up_values = {s.get(f'up{{mi="{target}"}}') for s in samples}
            mi.popen.send_signal(signal.SIGUSR1)
            recovered = None
            t0 = time.monotonic()
            while can_be_up and time.monotonic() - t0 < 30:
                if metrics(url.group(1)).get(f'up{{mi="{target}"}}') == 1.0:
                    recovered = time.monotonic() - t0
                    break
                time.sleep(0.1)
            results[kind] = {
                "log_lines_after_ready": len(lines),
                "log_lines_whole_run": len(engine.err) - 1,  # all but the ready line
                "log": [x.strip()[:160] for x in engine.err if "ready:" not in x][:12],
                "up_seen": sorted(v for v in up_values if v is not None),
                "errors": {
                    re.sub(r'.*reason="(\w+)".*', r"\1", k): int(v)
                    for k, v in errors_now.items()
                    if v
                },
                "errors_grew_last_15s": sum(errors_now.values()) > sum(errors_then.values()),
                "subscribed": end.get(f'subscribed_events{{mi="{target}"}}'),
                "refused": end.get(f'refused_events{{mi="{target}"}}'),
                "rss_mib": [round(rss0 / 1024, 1), round(peak / 1024, 1)],
                "rss_growth_mib": round((peak - rss0) / 1024, 1),
                "recovered_s": None if recovered is None else round(recovered, 2),
            }
        finally:
            engine.stop()
    finally:
        mi.popen.kill()
        mi.popen.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("kinds", nargs="*", default=list(KINDS))
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        threads = [
            threading.Thread(target=soak, args=(k, args.seconds, Path(tmp), results))
            for k in args.kinds
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
