"""The reference contenders, one sender process each round: `baseline` (what
OpenSIPS does in C: `json.dumps` and a non-blocking `sendto` per subscriber per
event) and `ceiling` (pre-encoded datagrams with `sendmmsg`, 256 per call: what the
kernel gives one sending core; the engine's CPU efficiency is measured against it)."""

from __future__ import annotations

import os
from typing import Any

from engine.bench.baseline import RunSpec, SenderProcess
from engine.bench.live import per
from engine.bench.receivers import RoundReport
from engine.bench.rounds.skeleton import BenchHost, Round, Window


class SenderRound(Round):
    def __init__(self, bench: BenchHost, number: int, contender: str) -> None:
        super().__init__(bench, number)
        assert bench.sender is not None
        self.sender: SenderProcess = bench.sender
        self.contender = contender
        self.mode = "seq" if contender == "baseline" else "count"

    def set_up(self) -> None:
        self.bench.progress.phase = f"{self.contender} round {self.number}"
        self.pids = {"sender": [self.sender.pid], "receivers": self.pool.pids}
        self.others = [os.getpid()]

    def window(self) -> Window:
        args = self.args
        baseline = self.contender == "baseline"
        spec = RunSpec(
            self.pool.sockets,
            args.duration,
            args.rate if baseline else 0.0,
            self.tag,
            args.baseline_encode_once,
        )
        out = self.sender.run("naive" if baseline else "ceiling", spec)
        t0, t_end = out["t0_ns"], out["t_end_ns"]
        return Window(t0, t_end, t_end, out["events"], out["sent"], out["failures"])

    def finish(self, result: dict[str, Any], window: Window, report: RoundReport) -> None:
        result["datagrams_per_sending_cpu_s"] = per(window.sent, result["cpu_s"]["sender"])
        result.update(events=window.events, drops={}, oversize=0, identity_errors=[])
