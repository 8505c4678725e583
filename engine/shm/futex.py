"""Linux futexes on words in shared memory: how an idle worker sleeps and is woken.

`wait(address, expected, timeout_s)` sleeps while the 32-bit word at `address`
still holds `expected` (the kernel checks it after queueing the waiter, so a
change that lands before the check is never slept through); `wake(address)`
wakes the waiters. The futexes are shared (no FUTEX_PRIVATE_FLAG): the kernel
keys them by the mapped file and offset, so the producer and a worker that map
the same segment at different addresses meet on the same word.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Final

SYS_FUTEX: Final = 202  # x86-64 (the ring refuses other architectures)
FUTEX_WAIT: Final = 0
FUTEX_WAKE: Final = 1
WAKE_ALL: Final = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def wait(address: int, expected: int, timeout_s: float) -> bool:
    """Sleep until woken, or `timeout_s`, unless the word at `address` is no longer
    `expected` (then return at once). True when woken or the word had changed;
    False on time-out or a signal (the caller re-checks either way)."""
    whole = int(timeout_s)
    timeout = _Timespec(whole, int((timeout_s - whole) * 1e9))
    rc = _syscall(
        SYS_FUTEX,
        ctypes.c_void_p(address),
        FUTEX_WAIT,
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ctypes.byref(timeout),
        None,
        0,
    )
    if rc == 0:
        return True
    return ctypes.get_errno() == errno.EAGAIN


def wake(address: int) -> int:
    """Wake every waiter on the word at `address`; return how many were woken."""
    rc = _syscall(SYS_FUTEX, ctypes.c_void_p(address), FUTEX_WAKE, WAKE_ALL, None, None, 0)
    return max(0, int(rc))
