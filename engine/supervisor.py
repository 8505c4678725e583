"""Start, pin, watch, restart, drain and stop the worker processes.

Why this is long: one loop and its restart protocol (segments, pinning,
snapshots, drain) share the worker table; each step is a short method.

The supervisor thread's loop is short: wait for a worker to die (its process
sentinel) or for the next tick; restart the dead one on the same ring and
counter region; kill a worker that is stuck (its ring has held records for
`heartbeat_timeout_s` while its heartbeat stood still, as gunicorn's
`murder_workers` does), so it is restarted; let the host do its periodic
housekeeping. A worker that dies before it ever became ready counts as a boot
failure; BOOT_ATTEMPTS of those in a row stop the engine with the reason
instead of crash-looping.

The supervisor knows its host only through `SupervisorHost` (the Engine is
one): it never imports the producer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Final, Protocol

from engine.errors import EngineError
from engine.options import EngineOptions
from engine.shm.counters import (
    STATE_BOOTING,
    STATE_READY,
    CounterBlock,
    CounterLayout,
    block_size,
)
from engine.shm.doorbell import Doorbell
from engine.shm.ring import ControlPayload, Ring, check_architecture, segment_size
from engine.shm.segment import (
    Segment,
    check_instance_name,
    check_shm_room,
    list_segments,
    lock_instance,
    lock_path,
    segment_name,
    segment_owner,
    unlink_name,
    unlock_instance,
)
from engine.shm.spec import WorkerSpec

log = logging.getLogger("event_datagram.supervisor")


class SupervisorHost(Protocol):
    """What the supervisor needs from the engine it serves."""

    def hot_lock(self) -> contextlib.AbstractContextManager[Any]:
        """The raise path's lock: held while a worker's ring and table are reset."""
        ...

    def snapshot_for(self, worker: int, read_pos: int) -> list[tuple[int, ControlPayload]]:
        """The worker's subscriber table as of ring position `read_pos`."""
        ...

    def tick(self) -> None:
        """Periodic housekeeping, from the supervisor thread."""
        ...

    def fail(self, reason: str) -> None:
        """Workers cannot be kept alive: the host stops accepting events."""
        ...


class WorkerProcess:
    """A worker started as `python -m workers` (a fresh interpreter: nothing of the
    embedding application's __main__ is re-run), its spec pickled on stdin.
    `sentinel` is a pidfd: readable once the process has exited."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.popen = subprocess.Popen(
            # -P: never put the current directory on sys.path (a `workers` folder
            # there must not replace ours).
            [sys.executable, "-P", "-m", "workers"],
            stdin=subprocess.PIPE,
            close_fds=True,
            pass_fds=(spec.doorbell_fd,),  # its ring's doorbell, at the same number
        )
        self.pid = self.popen.pid
        self.sentinel = os.pidfd_open(self.pid)
        self.killed_because: str | None = None  # set when the supervisor kills it
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(pickle.dumps(spec))
            self.popen.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the sentinel reports it

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.sentinel)


BOOT_ATTEMPTS: Final = 3
BOOT_TIMEOUT_S: Final = 20.0
TICK_S: Final = 0.1


class Supervisor:
    def __init__(self, options: EngineOptions, host: SupervisorHost) -> None:
        self.host = host
        self.options = options
        self.rings: list[Ring] = []
        self._doorbells: list[Doorbell] = []  # one per ring, kept across worker restarts
        self.counters: CounterBlock | None = None
        self.cpus: list[int | None] = []
        self.restarts: list[int] = []
        self._segments: list[Segment] = []
        self._procs: list[WorkerProcess | None] = []
        self._boot_failures: list[int] = []
        self._crashes_at: list[tuple[int, int]] = []
        # Per worker: (read position, monotonic ns) since when records have waited
        # at that read position, as this thread saw it; None while it makes progress.
        self._waiting_since: list[tuple[int, int] | None] = []
        self.stuck_kills: list[int] = []
        self.nudges: list[int] = []  # lost wake-ups the supervisor made up for, per worker
        self._stalled_at: list[tuple[int, int] | None] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._workers_gone = threading.Event()
        self._booted = threading.Event()
        self._boot_error: str | None = None
        self._saved_affinity: list[int] | None = None
        self._lock_fd: int | None = None  # the instance lock, while the segments exist
        self._lock_path: str | None = None
        self.running = False

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        check_architecture()
        opts = self.options
        instance = check_instance_name(opts.instance)
        self._lock_path = lock_path(opts.resolved_runtime_dir(), instance)
        self._lock_fd = lock_instance(opts.resolved_runtime_dir(), instance)
        try:
            self._reclaim(instance)
        except BaseException:
            self._free_segments()  # releases the lock
            raise
        workers, producer_cpu = self._plan_cpus()
        layout = CounterLayout(opts.max_events)
        try:
            check_shm_room(
                block_size(workers, layout) + workers * segment_size(opts.ring_bytes),
                f"{workers} worker(s) with {opts.ring_bytes}-byte rings",
            )
            seg = Segment.create(segment_name(instance, "counters"), block_size(workers, layout))
            self._segments.append(seg)
            CounterBlock.format(seg.buf, workers, opts.max_events, os.getpid())
            self.counters = CounterBlock(seg.buf)
            for k in range(workers):
                ring_seg = Segment.create(
                    segment_name(instance, f"ring{k}"), segment_size(opts.ring_bytes)
                )
                self._segments.append(ring_seg)
                Ring.format(ring_seg.buf, opts.ring_bytes)
                doorbell = Doorbell.create()
                self._doorbells.append(doorbell)
                self.rings.append(Ring(ring_seg.buf, doorbell))
        except BaseException:
            self._free_segments()
            raise
        self._procs = [None] * workers
        self._auto_socket_limit = auto_socket_limit(workers)
        self.restarts = [0] * workers
        self._boot_failures = [0] * workers
        self._crashes_at = [(-1, 0)] * workers  # (ring position, errors in a row there)
        self._waiting_since = [None] * workers
        self.stuck_kills = [0] * workers
        self.nudges = [0] * workers
        self._stalled_at = [None] * workers
        if producer_cpu is not None:
            self._pin_producer(producer_cpu)
        self.running = True
        self._thread = threading.Thread(target=self._run, name="edg-supervisor", daemon=True)
        self._thread.start()
        if not self._booted.wait(BOOT_TIMEOUT_S) or self._boot_error:
            reason = self._boot_error or f"workers not ready after {BOOT_TIMEOUT_S:.0f} s"
            self.stop(0.0)
            raise EngineError(reason)

    def _reclaim(self, instance: str) -> None:
        """Remove segments a dead engine of this instance left; refuse if one still runs."""
        names = list_segments(instance)
        live = {pid for pid in map(segment_owner, names) if pid is not None and _alive(pid)}
        if live:
            raise EngineError(
                f"instance {instance!r} is already running (pid {min(live)}); "
                f"stop it or choose another instance name"
            )
        for name in names:
            unlink_name(name)
        if names:
            log.warning("reclaimed %d stale shared-memory segment(s): %s", len(names), names)

    def _plan_cpus(self) -> tuple[int, int | None]:
        """Number of workers and the producer's CPU; fills self.cpus (one per worker)."""
        opts = self.options
        import psutil

        try:
            available = sorted(psutil.Process().cpu_affinity())
        except (AttributeError, psutil.Error, OSError):
            available = list(range(os.cpu_count() or 1))
        workers = opts.workers or max(1, len(available) - 1)
        producer_cpu: int | None = None
        if not opts.pin:
            self.cpus = [None] * workers
        elif opts.cpus:
            self.cpus = [opts.cpus[k % len(opts.cpus)] for k in range(workers)]
            spare = [c for c in available if c not in opts.cpus]
            producer_cpu = spare[0] if spare else None
        elif len(available) > workers:
            producer_cpu = available[0]
            self.cpus = list(available[1 : workers + 1])
        else:
            self.cpus = [available[k % len(available)] for k in range(workers)]
        return workers, producer_cpu

    def _pin_producer(self, cpu: int) -> None:
        import psutil

        with contextlib.suppress(psutil.Error, OSError, ValueError):
            me = psutil.Process()
            self._saved_affinity = me.cpu_affinity()
            me.cpu_affinity([cpu])

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        # Workers are spawned from this thread: their PR_SET_PDEATHSIG fires when it ends.
        try:
            for k in range(len(self.rings)):
                self._spawn(k)
            self._wait_ready()
        except Exception as exc:  # pragma: no cover - reported to start()
            self._boot_error = f"cannot start workers: {exc}"
        self._booted.set()
        next_tick = time.monotonic()
        while not self._stopping.is_set():
            sentinels = [p.sentinel for p in self._procs if p is not None]
            timeout = max(0.0, next_tick - time.monotonic())
            ready = wait(sentinels, timeout) if sentinels else self._stopping.wait(timeout)
            if self._stopping.is_set():
                break
            if ready:
                self._reap()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self._kill_stuck_workers()
                self._nudge_stalled_sleepers()
                try:
                    self.host.tick()
                except Exception:  # housekeeping must never kill the supervisor
                    log.exception("engine housekeeping failed")
        # Stopping: this thread must outlive the workers (their PDEATHSIG is tied to
        # it), so it waits here until join_workers() has seen them all exit.
        self._workers_gone.wait()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        assert self.counters is not None
        while time.monotonic() < deadline:
            if self._boot_error:
                return
            if all(self.counters.region(k).state == STATE_READY for k in range(len(self.rings))):
                return
            for k, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive():
                    self._reap_one(k, proc)
            time.sleep(0.01)
        self._boot_error = f"workers not ready after {BOOT_TIMEOUT_S:.0f} s"

    def _spawn(self, k: int) -> None:
        assert self.counters is not None
        with self.host.hot_lock():
            region = self.counters.region(k)
            ring = self.rings[k]
            redelivered = region.recover(ring)
            if redelivered:
                log.warning(
                    "worker %d: %d pair(s) of its last batch will be resent", k, redelivered
                )
            snapshot = self.host.snapshot_for(k, ring.read_pos)
            region.mark_booting()
            self._waiting_since[k] = None
            opts = self.options
            spec = WorkerSpec(
                index=k,
                ring_name=segment_name(opts.instance, f"ring{k}"),
                counters_name=segment_name(opts.instance, "counters"),
                cpu=self.cpus[k],
                batch_max=opts.batch_max,
                use_sendmmsg=opts.use_sendmmsg,
                socket_limit=opts.socket_limit or self._auto_socket_limit,
                unix_wait_ms=opts.unix_wait_ms,
                max_delay_ms=opts.max_delay_ms,
                idle_poll_ms=opts.idle_poll_ms,
                doorbell_fd=self._doorbells[k].fd,
                sndbuf=opts.sndbuf_bytes,
                parent_pid=os.getpid(),
                snapshot=snapshot,
            )
            self._procs[k] = WorkerProcess(spec)

    def _nudge_stalled_sleepers(self) -> None:
        """Ring for a worker seen asleep with records waiting at the same read position
        on two ticks in a row: its wake-up was lost (a bug; counted and logged), and
        it has no time-out of its own to find out (shm/doorbell.py)."""
        for k, ring in enumerate(self.rings):
            stalled = ring.stalled_sleep()
            if stalled is not None and stalled == self._stalled_at[k]:
                ring.nudge()
                self.nudges[k] += 1
                log.warning("worker %d slept with records waiting: woken by the supervisor", k)
                stalled = None
            self._stalled_at[k] = stalled

    def _kill_stuck_workers(self) -> None:
        """Kill a ready worker whose ring has held records at the same read position,
        with its heartbeat standing still, for `heartbeat_timeout_s` (a hung system
        call, a SIGSTOP, a livelock); the sentinel then reports it and it is
        restarted on the same ring. An idle worker (empty ring) is never killed,
        however long it sleeps."""
        timeout_ns = int(self.options.heartbeat_timeout_s * 1e9)
        if not timeout_ns or self.counters is None:
            return
        now = time.monotonic_ns()
        for k, proc in enumerate(self._procs):
            ring = self.rings[k]
            read_pos = ring.read_pos
            if proc is None or proc.killed_because or ring.write_pos == read_pos:
                self._waiting_since[k] = None
                continue
            waiting = self._waiting_since[k]
            if waiting is None or waiting[0] != read_pos:
                self._waiting_since[k] = (read_pos, now)
                continue
            region = self.counters.region(k)
            silent_ns = now - max(waiting[1], region.heartbeat_ns)
            if region.state != STATE_READY or silent_ns < timeout_ns:
                continue
            proc.killed_because = (
                f"was killed by the supervisor: no progress for {silent_ns / 1e9:.1f} s "
                f"with {ring.write_pos - read_pos} bytes waiting in its ring "
                f"(engine.heartbeat_timeout_s = {self.options.heartbeat_timeout_s:g})"
            )
            self.stuck_kills[k] += 1
            proc.kill()

    def _reap(self) -> None:
        for k, proc in enumerate(self._procs):
            if proc is not None and proc.exitcode is not None:
                self._reap_one(k, proc)

    def _reap_one(self, k: int, proc: WorkerProcess) -> None:
        assert self.counters is not None
        proc.join(0)
        proc.close()
        # READY, or EXITED (set by a worker that had been ready), means it booted.
        was_ready = self.counters.region(k).state != STATE_BOOTING
        how = proc.killed_because or _describe_exit(proc.exitcode)
        log.error("worker %d (pid %s) %s", k, proc.pid, how)
        if self._stopping.is_set():
            self._procs[k] = None
            return
        if was_ready:
            self._boot_failures[k] = 0
            reason = self._poisoned(k, proc.exitcode)
            if reason:
                self._give_up(k, reason)
                return
        else:
            self._boot_failures[k] += 1
            if self._boot_failures[k] >= BOOT_ATTEMPTS:
                reason = (
                    f"worker {k} failed to start {BOOT_ATTEMPTS} times in a row "
                    f"(last: {_describe_exit(proc.exitcode)})"
                )
                self._boot_error = reason
                self._give_up(k, reason)
                return
        self.restarts[k] += 1
        self._spawn(k)

    def _poisoned(self, k: int, exitcode: int | None) -> str | None:
        """A worker that errors out (not a signal) again and again at the same ring
        position, with records waiting, is stuck on something it cannot process."""
        ring = self.rings[k]
        pos = ring.read_pos
        if not exitcode or exitcode < 0 or ring.write_pos == pos:
            self._crashes_at[k] = (-1, 0)
            return None
        last_pos, count = self._crashes_at[k]
        count = count + 1 if last_pos == pos else 1
        self._crashes_at[k] = (pos, count)
        if count < BOOT_ATTEMPTS:
            return None
        return (
            f"worker {k} failed {count} times in a row at ring position {pos} "
            f"(last: {_describe_exit(exitcode)}); see its error output above"
        )

    def _give_up(self, k: int, reason: str) -> None:
        self._procs[k] = None
        self.host.fail(reason)
        self._stopping.set()

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, drain_timeout_s: float) -> None:
        """Wait for workers to drain and exit (they were sent STOP), then free everything."""
        self.join_workers(drain_timeout_s)
        self.free()

    def stopping(self) -> None:
        """From now on, exiting workers are not replaced."""
        self._stopping.set()

    def join_workers(self, drain_timeout_s: float) -> None:
        """Wait for workers to drain and exit; terminate those past the deadline.

        Bounded whatever the number of workers: one deadline for the drain, then
        every late worker is terminated at once and given one more second in all,
        then killed."""
        deadline = time.monotonic() + drain_timeout_s
        self._stopping.set()
        procs = [(k, p) for k, p in enumerate(self._procs) if p is not None]
        for _, proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        late = [(k, p) for k, p in procs if p.is_alive()]
        for k, proc in late:
            ring = self.rings[k]
            left = ring.pending_fanout()  # slow path: the worker is leaving anyway
            log.warning(
                "worker %d did not drain in %.1f s: %d datagram(s) in %d byte(s) of its "
                "ring are not sent; killing it",
                k, drain_timeout_s, left, ring.write_pos - ring.read_pos,
            )  # fmt: skip
            proc.killed_because = "was killed at the drain deadline"
            proc.kill()  # workers ignore SIGTERM (a group signal must not stop them)
        for _, proc in late:
            proc.join(1.0)
        for k, proc in procs:
            if proc.exitcode:
                log.error(
                    "worker %d (pid %s) %s while draining",
                    k,
                    proc.pid,
                    proc.killed_because or _describe_exit(proc.exitcode),
                )
            proc.close()
            self._procs[k] = None
        self._workers_gone.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self.running = False

    def free(self) -> None:
        """Unmap and unlink every segment; restore the producer's CPU affinity."""
        self._free_segments()
        if self._saved_affinity is not None:
            import psutil

            with contextlib.suppress(psutil.Error, OSError, ValueError):
                psutil.Process().cpu_affinity(self._saved_affinity)
            self._saved_affinity = None

    def _free_segments(self) -> None:
        """Unmap and unlink every segment, then release the instance lock."""
        for ring in self.rings:
            ring.release()
        if self.counters is not None:
            self.counters.release()
        for seg in self._segments:
            seg.unlink()
            with contextlib.suppress(BufferError):
                seg.close()
        self._segments.clear()
        self.rings = []
        for doorbell in self._doorbells:
            doorbell.close()
        self._doorbells = []
        self.counters = None
        if self._lock_fd is not None:
            unlock_instance(self._lock_fd, self._lock_path)
            self._lock_fd = None

    # -- introspection -----------------------------------------------------------------------------
    def pid_of(self, k: int) -> int | None:
        proc = self._procs[k] if k < len(self._procs) else None
        return proc.pid if proc is not None else None

    def alive(self, k: int) -> bool:
        proc = self._procs[k] if k < len(self._procs) else None
        return proc is not None and proc.is_alive()

    def ready(self, k: int) -> bool:
        return self.counters is not None and self.counters.region(k).state == STATE_READY


EPHEMERAL_SHARE: Final = 4  # connected UDP sockets may hold 1/4 of the ephemeral ports


def auto_socket_limit(workers: int) -> int:
    """Connected sockets per worker when engine.socket_limit is 0: together the
    workers hold at most a quarter of the ephemeral port range (each connected UDP
    socket binds one port), so the rest of the host keeps the others. The worker
    lowers it further to what its open-files limit allows."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        ports = max(0, high - low + 1)
    except (OSError, ValueError):
        ports = 28_232  # Linux's default range, 32768-60999
    return max(64, ports // EPHEMERAL_SHARE // max(1, workers))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the OOM killer or an operator?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"
