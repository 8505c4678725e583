"""What the supervisor hands a worker process: its `WorkerSpec`.

The spec travels pickled on the worker's stdin (`python -m workers`), so it
holds only names and numbers: the worker attaches its ring and its counter
region itself, by name, and rebuilds its subscriber table from `snapshot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.shm.ring import ControlPayload


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs; pickled into the spawned process."""

    index: int
    ring_name: str
    counters_name: str
    cpu: int | None = None
    batch_max: int = 256
    use_sendmmsg: bool = True
    socket_limit: int = 0  # 0 = as many as the open-files limit allows
    unix_wait_ms: float = 5.0  # per batch: how long full UNIX receivers may be waited for
    sndbuf: int = 0
    max_delay_ms: float = 0.0  # an event older than this is dropped as stale; 0 = never
    idle_poll_ms: float = 2.0  # after traffic, poll this long before sleeping until woken
    parent_pid: int = 0
    doorbell_fd: int = -1  # the ring's doorbell (shm/doorbell.py), inherited at this number
    # The worker's subscriber table as of its ring's read position, oldest first.
    snapshot: list[tuple[int, ControlPayload]] = field(default_factory=list)
