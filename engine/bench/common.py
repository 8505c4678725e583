"""What the bench's processes share: the payload, child set-up, /proc readers.

The bench payload is OpenSIPS's E_BENCH event (MEASUREMENTS.md section 7), with
its `count` replaced by a sequence number and a raise timestamp added, so a
receiver can count loss and duplicates and measure latency::

    {"jsonrpc":"2.0","method":"E_BENCH","params":{"tag":"","seq":1000000000,
     "ip":"192.168.2.11","t":895278403464}}

`seq` starts at SEQ_BASE (always 10 digits, so every datagram of a round has the
same size) and `t` is `time.monotonic_ns()` just before the raise (the monotonic
clock is shared by every process on Linux). The tag is padded to reach the
requested datagram size: with a 12-digit `t`, an empty tag gives 111 bytes and
the default 120 bytes is a 9-character tag.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Final, Literal

import msgspec

from engine.wire import MAX_PAYLOAD, encode_notification

EVENT: Final = "E_BENCH"
IP: Final = "192.168.2.11"
TAG_PATTERN: Final = "bench-payload-padding-0123456789ab"
SEQ_BASE: Final = 1_000_000_000
MAX_EVENTS_PER_ROUND: Final = 1 << 24  # every sending loop stops here, whatever the clock says
DEFAULT_PAYLOAD_BYTES: Final = 120
PACE_TICK_S: Final = 100e-6
"""Shortest sleep of a paced sender: below it, due events go out in small bursts
instead of the sender spinning on a CPU the receivers and workers need."""

PR_SET_PDEATHSIG: Final = 1
PR_SET_TIMERSLACK: Final = 29
PR_GET_TIMERSLACK: Final = 30


class BenchParams(msgspec.Struct, forbid_unknown_fields=True):
    tag: str
    seq: int
    ip: str
    t: int


class BenchPayload(msgspec.Struct, forbid_unknown_fields=True):
    """A complete bench datagram; decoding into it is the receivers' validity check."""

    jsonrpc: Literal["2.0"]
    method: str
    params: BenchParams


def bench_params(tag: str, seq: int, t_ns: int) -> dict[str, Any]:
    return {"tag": tag, "seq": seq, "ip": IP, "t": t_ns}


def payload_size(tag: str, t_ns: int) -> int:
    return len(encode_notification(EVENT, bench_params(tag, SEQ_BASE, t_ns)))


def make_tag(payload_bytes: int, t_ns: int) -> str:
    """The tag that makes the datagram exactly `payload_bytes` long (for this `t` width)."""
    smallest = payload_size("", t_ns)
    if not smallest <= payload_bytes <= MAX_PAYLOAD:
        raise ValueError(
            f"--payload-bytes {payload_bytes}: must be {smallest}-{MAX_PAYLOAD} "
            "(the smallest E_BENCH datagram, and the engine's maximum payload)"
        )
    n = payload_bytes - smallest
    reps = n // len(TAG_PATTERN) + 1
    return (TAG_PATTERN * reps)[:n]


# -- child processes -----------------------------------------------------------------------
def prctl(option: int, value: int) -> int | None:
    """prctl(2) through libc; None where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0))
    except (OSError, AttributeError):
        return None


def prepare_child(cpus: list[int] | None) -> None:
    """A bench child: dies with the bench, leaves Ctrl-C to it, may open as many
    sockets as the hard open-files limit allows (1,024 subscribers do not fit under
    the usual soft limit of 1,024), optionally pinned."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    raise_fd_limit()
    prctl(PR_SET_TIMERSLACK, 1000)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if cpus:
        import psutil

        with contextlib.suppress(psutil.Error, OSError, ValueError):
            psutil.Process().cpu_affinity(cpus)


class Child:
    """A bench child process: a fresh interpreter (`python -c`, so nothing of the
    caller's __main__ is re-run) running `target(conn, *args)`, with a
    multiprocessing Connection over a socketpair as its control pipe."""

    def __init__(self, target: str, args: tuple[Any, ...], name: str) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.name = name
        code = "import sys; from engine.bench.common import child_entry; child_entry(sys.argv[1])"
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", code, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.conn.send((target, args))

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def recv(self, timeout_s: float, what: str) -> Any:
        """The child's next message; RuntimeError if none within `timeout_s`."""
        if not self.conn.poll(timeout_s):
            state = "is still running" if self.alive() else f"exited ({self.popen.returncode})"
            raise RuntimeError(f"{self.name}: {what} within {timeout_s:.0f} s (it {state})")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: {what} (it exited)") from None

    def close(self, grace_s: float = 2.0) -> None:
        """Ask it to leave, then terminate, then kill: never leaves a process behind."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("exit",))
        for action in (None, self.popen.terminate, self.popen.kill):
            if action is not None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            try:
                self.popen.wait(grace_s if action is None else 1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        self.conn.close()


def child_entry(fd: str) -> None:
    """The child side of `Child`: receive the target and its arguments, run it."""
    conn = Connection(int(fd))
    name, args = conn.recv()
    module, func = name.split(":")
    getattr(importlib.import_module(module), func)(conn, *args)


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


# -- /proc ---------------------------------------------------------------------------------------
def peak_rss(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.Error, OSError):
        return None
    return float(t.user + t.system)


def process_cpu_ns(pid: int) -> int | None:
    """CPU time of a live process (all its threads), in nanoseconds, from its
    scheduler clock: exact, where /proc/PID/stat (and psutil) count 10 ms ticks,
    too coarse for an idle process. Falls back to psutil."""
    clock = ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), Linux
    try:
        return time.clock_gettime_ns(clock)
    except (OSError, OverflowError, AttributeError):
        seconds = cpu_seconds(pid)
        return None if seconds is None else int(seconds * 1e9)


def read_sysctl(name: str) -> int | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def net_counters() -> dict[str, int]:
    """System-wide loss counters the bench cannot see otherwise: UDP receive-buffer
    errors (v4 + v6) and packets dropped at the loopback backlog (softnet_stat)."""
    out = {"udp_rcvbuf_errors": 0, "udp_in_errors": 0, "backlog_drops": 0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/net/snmp", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        if len(lines) >= 2:
            row = dict(zip(lines[0][1:], lines[1][1:], strict=False))
            out["udp_rcvbuf_errors"] += int(row.get("RcvbufErrors", 0))
            out["udp_in_errors"] += int(row.get("InErrors", 0))
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/snmp6") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == "Udp6RcvbufErrors":
                out["udp_rcvbuf_errors"] += int(parts[1])
            elif parts and parts[0] == "Udp6InErrors":
                out["udp_in_errors"] += int(parts[1])
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/softnet_stat") as f:
        out["backlog_drops"] = sum(int(line.split()[1], 16) for line in f if line.strip())
    return out


def system_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds (busy, softirq, steal) so far: where a round's time went."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return {
        "busy": float(busy),
        "softirq": float(getattr(t, "softirq", 0.0)),
        "steal": float(getattr(t, "steal", 0.0)),  # a VM's CPUs taken by the hypervisor
    }


def available_cpus() -> list[int]:
    import psutil

    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error, OSError):
        return list(range(os.cpu_count() or 1))
