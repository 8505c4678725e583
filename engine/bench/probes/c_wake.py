"""The C chain beside the engine: wake.c (producer futex-wakes a sleeping process
pinned to the other core, which sends one UDP datagram to a receiver blocked in
recv) compiled with gcc at bench time and run in the idle phase, so the engine's
first-event latency is read against the kernel's own cost in the same run; and the
same chain in Python (py_wake.py), CPython's own floor, run beside it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

SOURCE: Final = Path(__file__).with_name("wake.c")
_LINE: Final = re.compile(
    r"n=(\d+) gap=(\d+)ms: p50 (\d+) us, p90 (\d+) us, p99 (\d+) us, max (\d+) us"
)
TIMEOUT_S: Final = 60.0


def parse(output: str) -> dict[str, Any] | None:
    """wake's one line of output -> seconds; None when it is not there."""
    m = _LINE.search(output)
    if m is None:
        return None
    n, gap, p50, p90, p99, mx = (int(g) for g in m.groups())
    return {
        "samples": n,
        "gap_ms": gap,
        "p50": p50 / 1e6,
        "p90": p90 / 1e6,
        "p99": p99 / 1e6,
        "max": mx / 1e6,
    }


def _chain(command: list[str], events: int, gap_ms: int) -> dict[str, Any]:
    """Run one chain program (`command` + events + gap) and read its line:
    {"status": "ok", p50.. in s} or {"status": "failed", "reason": ...}."""
    try:
        done = subprocess.run(
            [*command, str(events), str(gap_ms)],
            check=True,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S + events * gap_ms / 1000,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:200]}
    found = parse(done.stdout)
    if found is None:
        return {"status": "failed", "reason": f"unparsed output: {done.stdout[:200]!r}"}
    return {"status": "ok", **found}


def run_python(events: int = 100, gap_ms: int = 50) -> dict[str, Any]:
    """The same chain in Python (py_wake.py, in a fresh interpreter): CPython's own
    floor for the engine's idle latency. {"status": "ok", p50.. in s} or "failed"."""
    return _chain([sys.executable, "-m", "engine.bench.probes.py_wake"], events, gap_ms)


def run(events: int = 100, gap_ms: int = 50) -> dict[str, Any]:
    """Compile and run wake.c; {"status": "ok", p50.. in s} or {"status": "skipped"
    or "failed", "reason": ...} (never raises: the bench goes on without it)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return {"status": "skipped", "reason": "gcc not found"}
    if not SOURCE.is_file():
        return {"status": "skipped", "reason": "wake.c not shipped"}
    with tempfile.TemporaryDirectory(prefix="ed-wake-") as tmp:
        exe = Path(tmp) / "wake"
        try:
            subprocess.run(
                [gcc, "-O2", "-o", str(exe), str(SOURCE)],
                check=True,
                capture_output=True,
                timeout=TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:200]}
        return _chain([str(exe)], events, gap_ms)
