"""The receivers' sockets: binding one with a big receive buffer, and reading what
the kernel dropped at it (receiver overflow, told apart from the engine's loss)."""

from __future__ import annotations

import os
import socket
from typing import Final

SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)


PROC_UDP: Final = ("/proc/self/net/udp", "/proc/self/net/udp6")


def udp_drops(inodes: set[int]) -> dict[int, int]:
    """The kernel's drop count of each UDP socket (by inode) in `inodes`: datagrams it
    threw away because the socket's receive buffer was full (or memory ran short)."""
    found: dict[int, int] = {}
    if not inodes:
        return found
    for path in PROC_UDP:
        try:
            with open(path, "rb") as f:
                next(f, None)  # the header line
                for line in f:
                    fields = line.split()
                    # sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ref pointer drops
                    if len(fields) >= 13 and int(fields[9]) in inodes:
                        found[int(fields[9])] = int(fields[12])
        except (OSError, ValueError):
            continue  # no IPv6, or an unreadable table: those sockets report 0
    return found


def open_socket(
    kind: str, index: int, socket_dir: str, rcvbuf: int
) -> tuple[socket.socket, str, str, int]:
    """Bind one receiving socket; return it, its subscriber text, the buffer method,
    and the effective receive buffer (as getsockopt reports it: twice the setting)."""
    family = {"udp": socket.AF_INET, "udp6": socket.AF_INET6, "unix": socket.AF_UNIX}[kind]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    method = "SO_RCVBUFFORCE"
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        method = "SO_RCVBUF"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if kind == "unix":
        path = os.path.join(socket_dir, f"rx{index}.sock")
        sock.bind(path)
        text = f"unix:{path}"
    elif kind == "udp6":
        sock.bind(("::1", 0))
        text = f"udp:[::1]:{sock.getsockname()[1]}"
    else:
        sock.bind(("127.0.0.1", 0))
        text = f"udp:127.0.0.1:{sock.getsockname()[1]}"
    sock.setblocking(False)
    effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return sock, text, method, effective
