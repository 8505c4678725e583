"""A/B microbenchmark of engine.wire.check_notification (not a test: run it by hand).

    git show REV:engine/wire.py > /tmp/wire_before.py
    .venv/bin/python -m tests.helpers.bench_wire_check /tmp/wire_before.py

Interleaves runs of the given copy ("before") and of engine.wire ("after") on the
same notifications and prints CPU ns per call (time.thread_time, so time spent
descheduled on a busy machine is not counted): median and minimum of 9 runs each.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import engine.wire as after

RUNS = 9
OPENSIPS = b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}'


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("wire_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["wire_before"] = module  # msgspec resolves the structs' annotations here
    spec.loader.exec_module(module)
    return module


def _compact(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def cases() -> dict[str, bytes]:
    named = {f"k{i}": f"value number {i}" for i in range(25)}
    big = {f"key{i}": f"v\u00e9 {i}" for i in range(2400)}  # json.dumps escapes the é
    bigger = dict(list(big.items())[:1900])
    return {
        "opensips compact": OPENSIPS,
        "compact": _compact({"jsonrpc": "2.0", "method": "E_CALL_END", "params": named}),
        "compact big": _compact(
            {"jsonrpc": "2.0", "method": "E_BIG", "params": {"b": "x" * 60000}}
        ),
        "json.dumps": json.dumps(
            {"jsonrpc": "2.0", "method": "E_CALL_END", "params": named}
        ).encode(),
        "json.dumps big": json.dumps({"jsonrpc": "2.0", "method": "E_BIG", "params": big}).encode(),
        "indent=2": json.dumps(
            {"jsonrpc": "2.0", "method": "E_CALL_END", "params": named}, indent=2
        ).encode(),
        "indent=2 big": json.dumps(
            {"jsonrpc": "2.0", "method": "E_BIG", "params": bigger}, indent=2
        ).encode(),
    }


def _ns_per_call(check: Callable[[bytes], str], data: bytes, number: int) -> float:
    timer = timeit.Timer(lambda: check(data), timer=time.thread_time)
    return timer.timeit(number=number) / number * 1e9


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    before = _load(argv[0])
    for name, data in cases().items():
        checks = {"before": before.check_notification, "after": after.check_notification}
        for check in checks.values():
            check(data)  # both accept it
        number = 100_000 if len(data) < 10_000 else 3_000
        samples: dict[str, list[float]] = {label: [] for label in checks}
        for _ in range(RUNS):
            for label, check in checks.items():
                samples[label].append(_ns_per_call(check, data, number))
        b, a = (statistics.median(samples[label]) for label in checks)
        mb, ma = (min(samples[label]) for label in checks)
        print(
            f"{name:>16} ({len(data):5d} B): median {b:7.0f} -> {a:7.0f} ns "
            f"({100 * (a - b) / b:+6.1f}%); min {mb:7.0f} -> {ma:7.0f} ns"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
