"""The bench's round skeleton (engine/bench/rounds/): a real engine round against
real receivers, and the teardown that runs whatever the timed window does."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.bench.main import add_arguments
from engine.bench.receivers import ReceiverPool
from engine.bench.rounds.api import ApiRound
from engine.bench.run import Bench
from engine.shm.segment import list_segments


def bench_with_receivers(tmp_path: Path, *argv: str) -> Bench:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bench = Bench(parser.parse_args(["--subscribers", "2", "--workers", "1", *argv]))
    bench.pool = ReceiverPool(bench.kinds, 1, str(tmp_path), 1 << 20, 2048, None, 60.0)
    return bench


class FailingRound(ApiRound):
    def feed(self) -> tuple[int, int, int]:
        super().feed()
        raise RuntimeError("the window failed")


def test_a_round_whose_window_fails_still_stops_its_engine(tmp_path: Path) -> None:
    bench = bench_with_receivers(tmp_path)
    assert bench.pool is not None
    try:
        failing = FailingRound(bench, 1, 1000.0, 0.2, "seq")
        with pytest.raises(RuntimeError, match="the window failed"):
            failing.run()
        assert bench.engine is None
        assert list_segments(failing.instance) == [], "shared memory left behind"
        assert not failing.engine.supervisor.rings, "workers left running"
        # The receivers are not left mid-round: the next round runs and counts.
        result = ApiRound(bench, 2, 1000.0, 0.2, "seq").run()
    finally:
        bench.pool.close()
    assert result["contender"] == "engine" and result["round"] == 2
    assert result["datagrams_sent"] == 2 * result["events"] > 0
    assert result["loss"] == result["receiver_kernel_drops"] == 0
    assert result["engine_loss"] == 0 and result["limited_by"] == "sender"
    assert result["identity_errors"] == []
    assert set(result["cpu_s"]) == {"producer", "workers", "receivers"}
