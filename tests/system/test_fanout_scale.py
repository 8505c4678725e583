"""`python -m engine.bench.probes.fanout_scale`: the many-subscriber measurement runs and
reports what it claims (a small run; docs/benchmark.md quotes the 50,000 figure)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_fanout_scale_reports_sharing_and_rate() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine.bench.probes.fanout_scale", "--subscribers", "3000",
         "--events", "5"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["subscribers"] == 3000
    assert report["datagrams_sent"] == 15_000 and report["send_failures"] == 0
    assert report["datagrams_per_s"] > 0
    # Below the automatic connected-socket limit nobody shares; the engine holds
    # one socket per subscriber, far from the host's ephemeral range.
    assert report["shared_subscribers"] == max(0, 3000 - report["udp_sockets_held_by_engine"])
    assert report["udp_sockets_held_by_engine"] <= report["ephemeral_ports"] // 4 + 8
