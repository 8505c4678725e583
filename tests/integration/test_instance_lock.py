"""One engine per instance name, even when two start at the same moment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from engine.options import EngineOptions
from engine.producer import Engine
from engine.shm.segment import list_segments, lock_holder
from tests.helpers.support import running_engine, unique_instance

# Starts an engine at the wall-clock instant argv[3], holds it 1.5 s, stops it.
START_AT = """
import sys, time
from engine.errors import EngineError
from engine.options import EngineOptions
from engine.producer import Engine
opts = EngineOptions(instance=sys.argv[1], runtime_dir=sys.argv[2], workers=1, pin=False)
engine = Engine(opts, events=["E_TEST"])
while time.time() < float(sys.argv[3]):
    pass
try:
    engine.start()
except EngineError as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
print("started", flush=True)
time.sleep(1.5)
engine.stop()
"""


def test_two_engines_with_one_instance_name_started_at_once_one_runs(tmp_path: Path) -> None:
    instance = unique_instance("lock")
    for attempt in range(3):  # the same instant each time; three times over
        at = time.time() + 1.0
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", START_AT, instance, str(tmp_path), str(at)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=60) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 3], (attempt, outs)
        refused = next(out for out, _ in outs if out.startswith("refused"))
        assert f"instance {instance!r} is already running" in refused
        assert "choose another instance name" in refused
        assert not list_segments(instance), "shared memory left behind"


def test_the_lock_file_is_removed_on_stop_and_a_killed_ones_is_taken_over(tmp_path: Path) -> None:
    instance = unique_instance("lockfile")
    lock = tmp_path / f"{instance}.lock"
    opts = EngineOptions(instance=instance, runtime_dir=str(tmp_path), workers=1, pin=False)
    engine = Engine(opts, events=["E_TEST"]).start()
    try:
        assert lock.read_text() == f"{os.getpid()}\n"
        assert lock_holder(str(tmp_path), instance) == os.getpid()
    finally:
        engine.stop()
    assert not lock.exists()
    assert lock_holder(str(tmp_path), instance) is None
    # A killed engine leaves its file, unlocked: not a running engine, and taken over.
    lock.write_text("999999\n")
    assert lock_holder(str(tmp_path), instance) is None
    with running_engine(instance=instance, runtime_dir=str(tmp_path), workers=1, pin=False):
        assert lock_holder(str(tmp_path), instance) == os.getpid()
    assert not lock.exists()
    assert os.listdir(tmp_path) == []
