"""The engine's own settings (the `[engine]` table of the config file)."""

from __future__ import annotations

import os
from typing import Final, Literal

import msgspec

from engine import paths

RING_MIN: Final = 262_144
RING_MAX: Final = 1 << 32
MAX_WORKERS: Final = 256


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _ranges(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2, 5"."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and cpu - 1 == int(out[-1].rsplit("-", 1)[-1]):
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ", ".join(out)


class EngineOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the fan-out engine runs. Every field has a working default."""

    instance: str = "default"
    """Names this engine's shared-memory segments (edg-<instance>-*)."""
    workers: int = 0
    """Worker processes; 0 = CPUs - 1, at least 1."""
    cpus: list[int] = msgspec.field(default_factory=list)
    """CPUs to pin workers to, in order; empty = every CPU but the producer's."""
    pin: bool = True
    """Pin workers (and the producer, where a CPU is left for it) with psutil."""
    ring_bytes: int = 8 * 1024 * 1024
    """Data bytes per worker ring."""
    full_ring_policy: Literal["drop", "wait"] = "drop"
    """With a full ring: drop the event for that worker (counted) or wait."""
    full_ring_wait_ms: float = 10.0
    """With policy "wait": the longest a raise waits for room before dropping."""
    max_pending_datagrams: int = 1_000_000
    """Per worker: a ring counts as full for an event when the datagrams it already
    holds plus this event's would pass this (about 3 s of one core's sending); 0 = no
    bound but the ring's bytes."""
    max_delay_ms: float = 0.0
    """A worker drops (counted `stale`) an event raised longer ago than this instead
    of sending it late; 0 = no limit."""
    idle_poll_ms: float = 2.0
    """After its last batch, a worker polls (50 us sleeps) this long, then sleeps
    until the producer wakes it. Short: polling costs ~20% of a core while it lasts,
    a wake-up one system call on the raise path."""
    batch_max: int = 256
    """Most event records a worker sends per round."""
    drain_timeout_s: float = 5.0
    """On stop: how long workers may take to drain their rings."""
    max_events: int = 256
    """Event-id slots in the counter block."""
    use_sendmmsg: bool = True
    """False forces the portable one-send-per-datagram path."""
    socket_limit: int = 0
    """Connected sockets per worker; beyond it subscribers share one unconnected
    socket per family. 0 = as many as the open-files limit allows."""
    sndbuf_bytes: int = 0
    """SO_SNDBUF for subscriber sockets; 0 = the kernel default."""
    unix_wait_ms: float = 5.0
    """Per batch: how long a worker may wait for full UNIX receiver queues to drain
    before the rest counts as eagain failures. A receiver that drained nothing in
    that time is not waited for again until it reads. 0 = never wait."""
    failover_timeout_s: float = 30.0
    """A group member (virtual FAILOVER, ROUND-ROBIN, HASH) whose send failed is
    skipped this long, then tried again (OpenSIPS event_virtual's failover_timeout)."""
    heartbeat_timeout_s: float = 5.0
    """A worker whose ring holds records while it shows no progress for this long is
    killed and restarted (its heartbeat: each poll, batch and subscriber); 0 = never."""
    runtime_dir: str = ""
    """Where the engine keeps its runtime files (lock, sockets); "" = $RUNTIME_DIRECTORY,
    $XDG_RUNTIME_DIR/event-datagram, /run/event-datagram as root, or /tmp/event-datagram."""

    def __post_init__(self) -> None:
        usable = _usable_cpus()
        checks = (
            (0 <= self.workers <= MAX_WORKERS, "workers", f"must be 0-{MAX_WORKERS}"),
            (
                RING_MIN <= self.ring_bytes <= RING_MAX,
                "ring_bytes",
                f"must be {RING_MIN}-{RING_MAX} (4 GiB)",
            ),
            (self.ring_bytes % 8 == 0, "ring_bytes", "must be a multiple of 8"),
            (0 <= self.full_ring_wait_ms <= 10_000, "full_ring_wait_ms", "must be 0-10000"),
            (1 <= self.batch_max <= 1024, "batch_max", "must be 1-1024"),
            (self.max_pending_datagrams >= 0, "max_pending_datagrams", "must be >= 0"),
            (0 <= self.max_delay_ms <= 86_400_000, "max_delay_ms", "must be 0-86400000"),
            (0 <= self.idle_poll_ms <= 10_000, "idle_poll_ms", "must be 0-10000"),
            (0 <= self.drain_timeout_s <= 3600, "drain_timeout_s", "must be 0-3600"),
            (1 <= self.max_events <= 65535, "max_events", "must be 1-65535"),
            (self.socket_limit >= 0, "socket_limit", "must be >= 0"),
            (self.sndbuf_bytes >= 0, "sndbuf_bytes", "must be >= 0"),
            (0 <= self.unix_wait_ms <= 1000, "unix_wait_ms", "must be 0-1000"),
            (
                0 < self.failover_timeout_s <= 86_400,
                "failover_timeout_s",
                "must be more than 0 and at most 86400",
            ),
            (
                self.heartbeat_timeout_s == 0 or 0.5 <= self.heartbeat_timeout_s <= 3600,
                "heartbeat_timeout_s",
                "must be 0 (never) or 0.5-3600",
            ),
            (
                all(c in usable for c in self.cpus),
                "cpus",
                f"must be CPUs this process may run on: {_ranges(usable)}",
            ),
        )
        for ok, name, why in checks:
            if not ok:
                raise msgspec.ValidationError(f"{why} - at `$.{name}`")

    def resolved_runtime_dir(self) -> str:
        if self.runtime_dir:
            return self.runtime_dir
        return paths.runtime_dir()
