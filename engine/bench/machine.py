"""The machine the bench ran on and the kernel limits it met: read, never changed;
a warning (with the `sysctl -w` that lifts it) for each limit that binds."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any, Final

from engine.bench.common import read_sysctl

SYSCTLS: Final = (
    "net.core.rmem_max",
    "net.core.rmem_default",
    "net.core.wmem_max",
    "net.core.wmem_default",
    "net.core.netdev_max_backlog",
    "net.unix.max_dgram_qlen",
)
UNIX_QLEN_WANTED: Final = 1024


def machine_info() -> dict[str, Any]:
    import msgspec
    import psutil

    from engine.bench.common import available_cpus

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "cpu_model": model,
        "memory_bytes": int(psutil.virtual_memory().total),
        "kernel": platform.release(),
        "system": platform.system(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "msgspec": msgspec.__version__,
        "psutil": psutil.__version__,
        "loadavg_at_start": list(os.getloadavg()),
    }


def sysctl_info(
    kinds: Sequence[str], rcvbuf: int, buffers: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """The limits found (nothing is changed) and a warning for each that binds."""
    values: dict[str, Any] = {name: read_sysctl(name) for name in SYSCTLS}
    warnings: list[str] = []
    limits: list[dict[str, Any]] = []
    methods = sorted({str(b["method"]) for b in buffers})
    effective = min((int(b["effective"]) for b in buffers), default=0)
    values["receive_buffer"] = {
        "requested_bytes": rcvbuf,
        "method": methods[0] if len(methods) == 1 else methods,
        "effective_bytes": effective,  # getsockopt(SO_RCVBUF): the kernel doubles it
    }
    rmem_max = values["net.core.rmem_max"]
    if "SO_RCVBUF" in methods and effective < 2 * rcvbuf:
        limits.append(
            {
                "sysctl": "net.core.rmem_max",
                "value": rmem_max,
                "wanted": rcvbuf,
                "effect": "receive buffers capped: UDP receivers may overflow during bursts",
            }
        )
        warnings.append(
            f"net.core.rmem_max = {rmem_max} caps each receiver's SO_RCVBUF (asked for "
            f"{rcvbuf}; SO_RCVBUFFORCE needs CAP_NET_ADMIN). Overflows show as "
            f"udp_rcvbuf_errors and loss. To lift it: sysctl -w net.core.rmem_max={rcvbuf}"
        )
    qlen = values["net.unix.max_dgram_qlen"]
    if "unix" in kinds and qlen is not None and qlen < UNIX_QLEN_WANTED:
        limits.append(
            {
                "sysctl": "net.unix.max_dgram_qlen",
                "value": qlen,
                "wanted": UNIX_QLEN_WANTED,
                "effect": "a UNIX datagram receiver queues at most this many datagrams; "
                "senders get EAGAIN beyond it (counted as send failures, never retried)",
            }
        )
        warnings.append(
            f"net.unix.max_dgram_qlen = {qlen}: each UNIX receiver queues at most {qlen} "
            "datagrams, so fast senders get EAGAIN (the engine counts these as eagain "
            "failures; the receivers cannot keep up in bursts). To lift it: "
            f"sysctl -w net.unix.max_dgram_qlen={UNIX_QLEN_WANTED} (read when a socket is "
            "created: restart the receivers after changing it)"
        )
    values["limits"] = limits
    return values, warnings


def backlog_warning(values: dict[str, Any], drops: int) -> str:
    backlog = values.get("net.core.netdev_max_backlog")
    return (
        f"{drops} packet(s) dropped at the per-CPU input backlog "
        f"(net.core.netdev_max_backlog = {backlog}); loopback traffic passes through it. "
        f"To lift it: sysctl -w net.core.netdev_max_backlog={max(10000, 4 * (backlog or 1000))}"
    )
