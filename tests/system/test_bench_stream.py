"""`event-datagram bench --source stream` against the session's real RabbitMQ (with
its stream listener): an API round, then a stream round, accounted for."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli import main as cli
from engine.shm.segment import list_segments
from engine.testing.broker import LocalBroker


def test_source_stream_reads_every_message_and_relays_it(
    tmp_path: Path, rabbitmq: LocalBroker
) -> None:
    out = tmp_path / "stream.json"
    argv = [
        "bench", "--source", "stream", "--amqp-url", rabbitmq.url,
        "--stream-url", rabbitmq.stream_url, "--amqp-messages", "3000",
        "--rounds", "1", "--duration", "1", "--subscribers", "2", "--no-ceiling",
        "--latency-duration", "0", "--idle-latency-duration", "0", "--idle-cpu-duration", "0",
        "--quiet", "--json", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["error"] is None and doc["identity_errors"] == []
    assert [r["contender"] for r in doc["rounds"]] == ["engine", "stream", "baseline"]
    stream = doc["stream"]
    assert stream["messages_consumed"] == 3000 and stream["messages_consumed_per_s"] > 0
    assert set(stream["cpu_us_per_message"]) == {"producer", "workers", "receivers", "broker"}
    assert doc["ratio_stream_vs_api_median"] == stream["ratio_vs_api_median"] > 0
    (s,) = [r for r in doc["rounds"] if r["contender"] == "stream"]
    assert s["stream"]["rejected"] == {} and s["events"] == 3000
    handled = s["datagrams_sent"] + sum(s["send_failures"].values())
    assert handled == 2 * (s["events"] - sum(s["drops"].values())), (s["drops"], s["send_failures"])
    assert s["duplicates"] == 0 and s["invalid"] == 0 and s["stale"] == 0
    # --amqp-url: not the bench's own broker, so its CPU is not measured per engine
    assert "skipped" in stream["engines_scaling"]
    for instance in doc["settings"]["instances"]:
        assert list_segments(instance) == [], f"segments of {instance} left behind"
