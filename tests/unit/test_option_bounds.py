"""[engine] sizes and times are bounded, with the key named (issue: inf, 1e300,
100 GB rings and CPUs that do not exist were accepted)."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, loads


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("drain_timeout_s = inf", "drain_timeout_s"),
        ("drain_timeout_s = nan", "drain_timeout_s"),
        ("full_ring_wait_ms = 1e300", "full_ring_wait_ms"),
        ("ring_bytes = 100_000_000_000", "ring_bytes"),
        ("ring_bytes = 1000", "ring_bytes"),
        ("cpus = [999]", "cpus"),
        ("workers = 300", "workers"),
        ("max_delay_ms = -1", "max_delay_ms"),
        ("idle_poll_ms = 1e9", "idle_poll_ms"),
        ("heartbeat_timeout_s = 0.1", "heartbeat_timeout_s"),
        ("max_pending_datagrams = -5", "max_pending_datagrams"),
    ],
)
def test_out_of_range_engine_settings_name_their_key(line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"at `\$\.engine\.{key}`"):
        loads(f"[engine]\n{line}\n", "bounds.toml")


def test_cpus_name_what_this_machine_offers() -> None:
    with pytest.raises(ConfigError, match=r"must be CPUs this process may run on: 0"):
        loads("[engine]\ncpus = [999]\n", "cpus.toml")
