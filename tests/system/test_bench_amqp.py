"""`event-datagram bench --source amqp` against the session's real RabbitMQ: an API
round and a broker round, every published message accounted for."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli import main as cli
from engine.shm.segment import list_segments
from engine.testing.broker import LocalBroker

AMQP_KEYS = {
    "datagrams_received_per_s", "datagrams_sent_per_s", "loss", "cpu_us_per_datagram",
    "messages_consumed_per_s", "messages_published_per_s", "messages_consumed",
    "cpu_us_per_message", "ratio_vs_api_median", "ratios_vs_api",
}  # fmt: skip


def test_source_amqp_interleaves_broker_rounds_and_accounts_for_every_message(
    tmp_path: Path, rabbitmq: LocalBroker
) -> None:
    out = tmp_path / "amqp.json"
    argv = [
        "bench", "--source", "amqp", "--amqp-url", rabbitmq.url, "--amqp-messages", "3000",
        "--rounds", "1", "--duration", "1", "--subscribers", "2", "--no-ceiling",
        "--latency-duration", "0", "--idle-latency-duration", "0", "--idle-cpu-duration", "0",
        "--quiet", "--json", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["error"] is None and doc["identity_errors"] == []
    assert [r["contender"] for r in doc["rounds"]] == ["engine", "amqp", "baseline"]
    amqp = doc["amqp"]
    assert set(amqp) >= AMQP_KEYS, AMQP_KEYS - set(amqp)
    assert set(doc["engine"]) <= set(amqp)  # the API contender's keys, and more
    assert amqp["messages_consumed"] == 3000 and amqp["messages_consumed_per_s"] > 0
    assert set(amqp["cpu_us_per_message"]) == {"producer", "workers", "receivers", "broker"}
    assert doc["ratio_amqp_vs_api_median"] == amqp["ratio_vs_api_median"] > 0
    (a,) = [r for r in doc["rounds"] if r["contender"] == "amqp"]
    assert a["amqp"]["rejected"] == {} and a["events"] == 3000
    # Each message to both subscribers, unless a full ring turned it away or a send
    # failed: both are counted; the receivers saw no duplicate or foreign datagram.
    handled = a["datagrams_sent"] + sum(a["send_failures"].values())
    assert handled == 2 * (a["events"] - sum(a["drops"].values())), (a["drops"], a["send_failures"])
    assert a["duplicates"] == 0 and a["invalid"] == 0 and a["stale"] == 0
    for instance in doc["settings"]["instances"]:
        assert list_segments(instance) == [], f"segments of {instance} left behind"
