"""The subscription state file: its format, a strict reader and an atomic writer.

Only expiring subscriptions are written (static ones come from the config).
The file is JSON, oldest subscription of each event first, so that replaying
it in order recreates the registry's newest-first lists::

    {"version": 1,
     "subscriptions": [{"event": "E_PIKE_BLOCKED", "socket": "udp:127.0.0.1:8081",
                        "expire": 3600, "subscribed_at": 1767225600.25}]}

``subscribed_at`` is the registry's wall clock at (re-)subscription, so a
reloaded subscription keeps only its remaining time. Anything the reader does
not fully understand (bad JSON, a truncated file, a wrong type, an unknown
field or version) is a StateFileError naming the file and msgspec's path, and
the registry then refuses to overwrite the file.

Writing is atomic: a temporary file in the same directory is written, flushed
and fsynced, renamed over the old file with os.replace, and the directory is
fsynced, so a crash leaves either the old or the new file, never a mix.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from typing import Annotated, Final

import msgspec

from engine.errors import StateFileError
from engine.wire import EventName

__all__ = [
    "MAX_EXPIRE",
    "STATE_VERSION",
    "StateEntry",
    "StateFileError",
    "StateStore",
    "read_state",
    "write_state",
]

log = logging.getLogger(__name__)

STATE_VERSION: Final = 1
MAX_EXPIRE: Final = 2**31 - 1  # seconds; OpenSIPS keeps expire in a C int


class StateEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One persisted subscription."""

    event: EventName
    socket: Annotated[str, msgspec.Meta(min_length=1)]
    expire: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPIRE)]
    subscribed_at: float


class _Header(msgspec.Struct):
    version: int  # other fields ignored: checked before the body is trusted


class _StateFile(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    subscriptions: list[StateEntry]


def read_state(path: str) -> list[StateEntry] | None:
    """Return the entries in file order, or None when the file does not exist.

    Raises StateFileError for anything else than a complete, valid version-1 file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(path, f"cannot read it: {exc.strerror or exc}") from None
    try:
        version = msgspec.json.decode(data, type=_Header).version
        if version != STATE_VERSION:
            raise StateFileError(path, f"unsupported version {version} (expected 1)")
        entries = msgspec.json.decode(data, type=_StateFile).subscriptions
    except msgspec.DecodeError as exc:
        raise StateFileError(path, f"corrupt: {exc}") from None
    for i, entry in enumerate(entries):
        if not math.isfinite(entry.subscribed_at):
            where = f"$.subscriptions[{i}].subscribed_at"
            raise StateFileError(path, f"corrupt: subscribed_at is not finite - at `{where}`")
    return entries


def write_state(path: str, entries: list[StateEntry]) -> None:
    """Replace the file atomically with ``entries``; raise StateFileError on failure."""
    data = msgspec.json.format(msgspec.json.encode(_StateFile(STATE_VERSION, entries)), indent=1)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = ""
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StateFileError(path, f"cannot write it: {exc.strerror or exc}") from None
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class StateStore:
    """The registry's state file, guarded so nothing is overwritten by mistake.

    A file that could not be read is never overwritten (every write raises
    StateFileError until ``read`` succeeds again), nor is an existing file
    that was never read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._owned = False  # read (or written) by us: ours to replace
        self._refusal: StateFileError | None = None

    def read(self) -> list[StateEntry] | None:
        try:
            entries = read_state(self.path)
        except StateFileError as exc:
            self._refusal = exc
            raise
        self._refusal, self._owned = None, True
        return entries

    def write(self, entries: list[StateEntry]) -> None:
        if self._refusal is not None:
            reason = f"not overwriting it ({self._refusal.reason}); fix it, then load() again"
            raise StateFileError(self.path, reason)
        if not self._owned and os.path.lexists(self.path):
            raise StateFileError(self.path, "exists but was not loaded; call load() first")
        write_state(self.path, entries)
        self._owned = True

    def write_quietly(self, entries: list[StateEntry]) -> None:
        """Best effort, for removals of expired entries (a reload drops those anyway)."""
        if self._refusal is None:
            try:
                self.write(entries)
            except StateFileError as exc:
                log.warning("%s", exc)
