"""An eventfd per ring: how an idle worker sleeps and how the producer wakes it.

The supervisor creates one `Doorbell` per ring and hands its descriptor to the
worker (inherited across exec, its number in the WorkerSpec; the same one to a
restarted worker). The worker blocks in `wait()`; the producer calls `ring()`.
The ring's sleep sequence decides when to ring, so an awake worker costs the
producer no system call (shm/ring.py: "Sleeping and waking"). An eventfd counts:
a ring that lands before the wait makes the wait return at once, so no wake-up
is lost between the worker's last look at its ring and its sleep.

Why an eventfd read and not a futex or poll(): each is one system call, but a
futex is reached from Python only through ctypes, whose call path is long and,
after a pause, cold, and poll() sets up a poll table and a timer on every call;
`os.eventfd_write` and a blocking `os.eventfd_read` are built-ins that go
straight to the eventfd's wait queue. On the 2-core development machine, after
50 ms asleep: the producer's wake call took p50 62 us through ctypes (futex), 33
us as an eventfd write; the worker ran 25 us sooner after a blocking read than
after poll() + read (docs/benchmark.md). The wait has no time-out: a worker's
parent's death kills it (PR_SET_PDEATHSIG), and a wake-up lost to a bug is
caught by the supervisor, which rings for a ring that sleeps with records
waiting (`Ring.nudge_if_stalled`).
"""

from __future__ import annotations

import contextlib
import os


class Doorbell:
    """One eventfd: `ring()` from the producer, `wait()` in the worker."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> Doorbell:
        """A new doorbell (close-on-exec: pass it on explicitly, `pass_fds`)."""
        return cls(os.eventfd(0, os.EFD_CLOEXEC))

    def ring(self) -> None:
        """Wake the waiter (or make its next wait return at once)."""
        os.eventfd_write(self.fd, 1)

    def wait(self) -> None:
        """Sleep until rung (at once if rung since the last wait); resets the count."""
        os.eventfd_read(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
