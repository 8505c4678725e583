"""The bench's ingest emitter options (engine/bench/baseline.py, main.py, run.py)."""

from __future__ import annotations

import argparse
import os

from engine.bench.baseline import scheduled_idle
from engine.bench.main import add_arguments
from engine.bench.rounds.ingest import ingest_rate


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_scheduled_idle_is_undone_after_the_block() -> None:
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with scheduled_idle(True):
        assert os.sched_getscheduler(0) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with scheduled_idle(False):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_the_ingest_rate_defaults_to_the_rate() -> None:
    assert ingest_rate(parse()) == 0.0
    assert ingest_rate(parse("--rate", "900")) == 900.0
    assert ingest_rate(parse("--rate", "900", "--ingest-rate", "25000")) == 25000.0
    assert ingest_rate(parse("--ingest-rate", "0", "--rate", "5")) == 0.0
    assert parse().emitter_sched == "normal"
    assert parse("--emitter-sched", "idle").emitter_sched == "idle"
