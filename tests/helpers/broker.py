"""A real RabbitMQ for the tests: engine.testing.broker.LocalBroker, found or refused.

The fixtures in tests/conftest.py (`rabbitmq`, one broker for the session;
`fresh_rabbitmq`, one per test, for tests that kill and restart it) come from
`running_broker()` here. RabbitMQ is Debian's `rabbitmq-server` (`make test`
installs it as root). Where it is missing a test that asks for a broker FAILS
with the command to install it; EVENT_DATAGRAM_SKIP_RABBITMQ=1 skips such tests
knowingly (never honoured in CI, CI=true).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from engine.testing.broker import LocalBroker, find_rabbitmq_server

START_TIMEOUT = 120.0  # a busy CI machine: a start takes 7-18 s here
INSTALL = (
    "RabbitMQ is not installed, so the broker tests cannot run.\n"
    "Install it (Debian/Ubuntu, as root; `make test` does this):\n"
    "    apt-get update && apt-get install -y --no-install-recommends rabbitmq-server\n"
    "(the package's own service is not needed: the tests start private brokers),\n"
    "or point EVENT_DATAGRAM_RABBITMQ_SERVER at a rabbitmq-server start script.\n"
    "To skip these tests knowingly (not in CI):\n"
    "    EVENT_DATAGRAM_SKIP_RABBITMQ=1 make test"
)


def rabbitmq_server() -> str:
    """The rabbitmq-server script; otherwise the test fails (or skips, when told to)."""
    found = find_rabbitmq_server()
    if found:
        return found
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.environ.get("EVENT_DATAGRAM_SKIP_RABBITMQ") == "1" and not in_ci:
        pytest.skip("EVENT_DATAGRAM_SKIP_RABBITMQ=1: the real-RabbitMQ tests were skipped")
    pytest.fail("\n" + "!" * 72 + "\n" + INSTALL + "\n" + "!" * 72, pytrace=False)


@contextmanager
def running_broker(**options: Any) -> Iterator[LocalBroker]:
    """A started LocalBroker (LocalBroker's keyword arguments), closed afterwards."""
    options.setdefault("start_timeout", START_TIMEOUT)
    with LocalBroker(server=rabbitmq_server(), **options) as broker:
        yield broker


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
