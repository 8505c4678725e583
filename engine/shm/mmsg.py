"""The C structures of sendmmsg(2)/recvmmsg(2), and the two calls, through ctypes.

Both sides use them: the workers send with sendmmsg, the ingest and the bench's
receivers read with recvmmsg. Defined once, here, beside the other layouts both
processes share.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Final


class IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class MsgHdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint))


def _load(name: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


SENDMMSG: Final = _load("sendmmsg", (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int))
"""sendmmsg(fd, msgs, vlen, flags), or None where libc lacks it."""
RECVMMSG: Final = _load(
    "recvmmsg", (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
)
"""recvmmsg(fd, msgs, vlen, flags, timeout), or None where libc lacks it."""
