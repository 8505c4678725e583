"""The shared-memory ring read by a real consumer process, the way a worker reads it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from engine.shm.ring import KIND_EVENT, Ring
from engine.shm.segment import SHM_DIR, Segment
from tests.helpers.support import RING_CAPACITY

CAPACITY = RING_CAPACITY  # the `ring` fixture's (tests/conftest.py)


CONSUMER = textwrap.dedent(
    """
    import sys
    from engine.shm.ring import Ring
    from engine.shm.segment import Segment
    seg = Segment.attach(sys.argv[1])
    ring = Ring(seg.buf)
    total = 0
    for pos, nxt, kind, eid, fanout, ts, length in ring.records(ring.read_pos, ring.write_pos):
        assert ring.payload(pos, length) == bytes([eid]) * length, pos
        total += 1
        ring.set_read_pos(nxt, total)
    print(total)
    """
)


def test_a_consumer_process_reads_and_its_exit_does_not_destroy_the_ring(
    segment: Segment, ring: Ring
) -> None:
    seg_name = segment.name
    for i in range(10):
        ring.append(KIND_EVENT, i, 1, 0, bytes([i]) * (10 + i))
    out = subprocess.run(
        [sys.executable, "-c", CONSUMER, seg_name], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "10"
    assert "resource_tracker" not in out.stderr
    # The consumer attached and exited: the segment must still be there and usable.
    assert os.path.exists(os.path.join(SHM_DIR, seg_name))
    assert ring.read_pos == ring.write_pos
    assert ring.append(KIND_EVENT, 1, 1, 0, b"still here")
