"""Named POSIX shared-memory segments: create, attach, reclaim.

The main process creates every segment through `multiprocessing.shared_memory`
(so Python's resource tracker unlinks them if the whole engine dies). Workers
attach *without* that tracker: in Python 3.11 a process that attaches through
`SharedMemory` registers the name too, and its resource tracker unlinks the
segment when that process exits -- a dying worker would destroy its own ring.
On Linux, glibc's `shm_open(name)` is `open("/dev/shm/" + name)`, so a worker
maps the file directly and nothing tracks it.

Every segment of one engine is named `edg-<instance>-<pid>-<part>`: a new engine
finds (by instance) and reclaims what a crashed engine of the same instance left
behind, and the pid keeps two generations apart -- the resource tracker of a
killed engine may unlink that engine's segments late, and must never hit the
segments its successor has just created under the same instance name.

Two engines must never share an instance name, even when they start at the same
moment (their pids differ, so their segment names would not collide): each
holds an exclusive `flock` on `<runtime dir>/<instance>.lock` while it runs,
which the kernel releases however the process ends (a clean stop also removes
the file).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
from multiprocessing import resource_tracker, shared_memory
from typing import Final

from engine.errors import EngineError

SHM_DIR: Final = "/dev/shm"
PREFIX: Final = "edg-"
_INSTANCE_RE: Final = re.compile(r"^[A-Za-z0-9_.]{1,48}$")


def check_instance_name(instance: str) -> str:
    """Return `instance` if it can name segments, else raise ValueError naming it."""
    if not _INSTANCE_RE.match(instance):
        raise ValueError(f"instance name {instance!r}: use 1-48 letters, digits, '_' or '.'")
    return instance


def lock_instance(runtime_dir: str, instance: str) -> int:
    """Take the instance's lock; return its descriptor (`unlock_instance` releases it
    and removes the file).

    Raises EngineError naming the instance (and the holder's pid) when another
    engine holds it, or when the lock file cannot be made.
    """
    path = lock_path(runtime_dir, instance)
    # An engine that stops unlinks the file while it holds the lock: a lock taken on
    # a file that is no longer (or not any more) at `path` is worthless, try again.
    for _attempt in range(100):
        try:
            os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EngineError(f"cannot create the instance lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise EngineError(
                f"instance {instance!r} is already running (pid {holder}, lock {path}); "
                f"stop it or choose another instance name"
            ) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise EngineError(f"cannot take the instance lock {path}: it keeps being replaced")


def lock_path(runtime_dir: str, instance: str) -> str:
    return os.path.join(runtime_dir, f"{check_instance_name(instance)}.lock")


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def lock_holder(runtime_dir: str, instance: str) -> int | None:
    """The pid of the engine that holds the instance's lock, or None when none runs."""
    path = lock_path(runtime_dir, instance)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        return None  # nobody holds it: a file left by an engine that was killed
    finally:
        os.close(fd)


def unlock_instance(fd: int, path: str | None = None) -> None:
    """Release the lock; with `path`, remove the file first (while still holding it)."""
    if path is not None and _same_file(fd, path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


def segment_name(instance: str, part: str, pid: int | None = None) -> str:
    return f"{PREFIX}{instance}-{os.getpid() if pid is None else pid}-{part}"


def segment_owner(name: str) -> int | None:
    """The engine pid in a segment name made by segment_name(), or None."""
    parts = name.split("-")
    return int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else None


class Segment:
    """One mapped shared-memory segment; `buf` is a writable memoryview of it."""

    def __init__(self, name: str, size: int, buf: memoryview, owner: object) -> None:
        self.name = name
        self.size = size
        self.buf = buf
        self._owner = owner  # the SharedMemory or mmap keeping the mapping alive

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create the segment with every page reserved (`posix_fallocate`), so a
        /dev/shm too small is an EngineError now, not a SIGBUS when a page is
        first touched."""
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]
        except OSError as exc:
            shm.close()
            shm.unlink()
            raise EngineError(
                f"cannot reserve {_mib(size)} of shared memory for {name}: "
                f"{exc.strerror} ({SHM_DIR} has {_mib(shm_free_bytes())} free)"
            ) from None
        assert shm.buf is not None
        return cls(name, size, shm.buf, shm)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment without registering it with a resource tracker."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, memoryview(mm), mm)

    def close(self) -> None:
        """Unmap. Every view derived from `buf` must have been released first."""
        self.buf.release()
        owner = self._owner
        if isinstance(owner, (shared_memory.SharedMemory, mmap.mmap)):
            owner.close()

    def unlink(self) -> None:
        """Remove the name; mappings stay valid until closed."""
        owner = self._owner
        if isinstance(owner, shared_memory.SharedMemory):
            try:
                owner.unlink()
            except FileNotFoundError:
                resource_tracker.unregister(owner._name, "shared_memory")  # type: ignore[attr-defined]
        else:
            unlink_name(self.name)


def shm_free_bytes() -> int:
    """Bytes an unprivileged process may still put in /dev/shm."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_shm_room(needed: int, what: str) -> None:
    """Raise EngineError, naming both sizes, when /dev/shm cannot hold `needed`."""
    free = shm_free_bytes()
    if needed > free:
        raise EngineError(
            f"{what} need {_mib(needed)} of shared memory, but {SHM_DIR} has only "
            f"{_mib(free)} free: lower engine.workers or engine.ring_bytes, or enlarge "
            f"{SHM_DIR} (a container's default is 64 MiB: docker run --shm-size)"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def unlink_name(name: str) -> bool:
    """Unlink a segment by name; False if it did not exist."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    return True


def list_segments(instance: str) -> list[str]:
    """Names of every segment that belongs to `instance`."""
    prefix = f"{PREFIX}{instance}-"
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))
