"""Shared memory is reserved at start: too little /dev/shm is a clear start-up
error naming the size needed and the size free, never a SIGBUS later."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.options import RING_MAX, EngineOptions
from engine.producer import Engine
from engine.shm.segment import list_segments, shm_free_bytes
from tests.helpers.support import unique_instance

# What a container gives by default: a 64 MiB /dev/shm. In a private mount
# namespace, so the host's /dev/shm is untouched.
SMALL_SHM_RUN = """
set -e
mount -t tmpfs -o size=64m tmpfs /dev/shm
cat > "$1/cfg.toml" <<CFG
events = ["E_TEST"]
[engine]
workers = 8
ring_bytes = 8388608
pin = false
instance = "$2"
runtime_dir = "$1"
[mi]
http = ""
datagram = ""
[state]
enabled = false
CFG
exec "$3" -m engine run --config "$1/cfg.toml"
"""


def test_a_small_dev_shm_is_a_clear_start_up_error(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm (CI has both)")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", SMALL_SHM_RUN, "sh",
         str(tmp_path), unique_instance("shm"), sys.executable],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "8 worker(s) with 8388608-byte rings need 66." in done.stderr
    assert "but /dev/shm has only 64.0 MiB free" in done.stderr
    assert "Traceback" not in done.stderr


def test_rings_larger_than_dev_shm_are_refused_before_anything_is_made() -> None:
    workers = shm_free_bytes() // RING_MAX + 1  # more than /dev/shm holds
    opts = EngineOptions(instance=unique_instance("big"), workers=workers, ring_bytes=RING_MAX)
    engine = Engine(opts, events=["E_TEST"])
    with pytest.raises(EngineError, match=r"need [0-9.]+ MiB of shared memory, but /dev/shm"):
        engine.start()
    assert not list_segments(opts.instance)
