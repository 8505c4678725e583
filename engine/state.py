"""The subscription state file: its format, a strict reader and its writers.

Only expiring subscriptions are written (static ones come from the config).
The file is a snapshot followed by a journal, JSON, one value per line::

    {"version":2,"subscriptions":[{"event":"E_PIKE_BLOCKED","socket":"udp:127.0.0.1:8081","expire":3600,"subscribed_at":1767225600.25}]}
    {"op":"set","event":"E_PIKE_BLOCKED","socket":"udp:127.0.0.1:8082","expire":60,"subscribed_at":1767225601.5}
    {"op":"del","event":"E_PIKE_BLOCKED","socket":"udp:127.0.0.1:8081"}
    [{"op":"del","event":"E_PIKE_BLOCKED","socket":"udp:127.0.0.1:8082"},{"op":"del",...}]

The first line is the snapshot, oldest subscription of each event first. Each
later line is one change, or an array of changes made together (a sweep),
appended and fsynced before the change is answered: ``set`` adds a subscription,
or replaces the one with the same event and socket in its place (a refresh),
``del`` removes one. Replaying the lines in order recreates the registry's
lists. ``subscribed_at`` is the registry's wall clock at (re-)subscription, so a
reloaded subscription keeps only its remaining time.

The journal is compacted into a new snapshot (`StateStore.commit`) once most of
what the file holds is dead (more records than twice the live subscriptions), so
its size stays proportional to the live ones and every change costs O(1)
amortised; the registry also compacts at load. A snapshot is written
atomically: a temporary file in the same directory is written, flushed and
fsynced, renamed over the old file with os.replace, and the directory is
fsynced, so a crash leaves either the old or the new file, never a mix.

The reader is strict. The one thing it forgives is a last line without its
newline: an append that a crash interrupted, which was never answered. It is
ignored with a warning (and gone at the next snapshot). Anything else it does
not fully understand (bad JSON, a truncated snapshot, a bad line anywhere else,
a wrong type, an unknown field or version) is a StateFileError naming the file,
the line and msgspec's path, and the registry then refuses to overwrite the
file. Version 1 files (one JSON document, the snapshot alone) are still read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from engine.errors import StateFileError
from engine.wire import EventName

__all__ = [
    "MAX_EXPIRE",
    "STATE_VERSION",
    "DelRecord",
    "Record",
    "SetRecord",
    "StateEntry",
    "StateFile",
    "StateFileError",
    "StateStore",
    "load_state",
    "read_state",
    "write_state",
]

log = logging.getLogger(__name__)

STATE_VERSION: Final = 2  # the version written; 1 (no journal) is still read
MAX_EXPIRE: Final = 2**31 - 1  # seconds; OpenSIPS keeps expire in a C int

Socket = Annotated[str, msgspec.Meta(min_length=1)]
Expire = Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPIRE)]


class StateEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One persisted subscription."""

    event: EventName
    socket: Socket
    expire: Expire
    subscribed_at: float
    filter: str = ""  # a filter's canonical text (engine.targets); "" = none


class SetRecord(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="op",
    tag="set",
    omit_defaults=True,
):
    """Journal: this subscription now (added, or refreshed in its place)."""

    event: EventName
    socket: Socket
    expire: Expire
    subscribed_at: float
    filter: str = ""


class DelRecord(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="op",
    tag="del",
    omit_defaults=True,
):
    """Journal: the subscription of `socket` (with `filter`) to `event` is gone."""

    event: EventName
    socket: Socket
    filter: str = ""


Record = SetRecord | DelRecord


class _Header(msgspec.Struct):
    version: int  # other fields ignored: checked before the body is trusted


class _StateFile(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    subscriptions: list[StateEntry]


_ENCODER: Final = msgspec.json.Encoder()
_HEADER: Final = msgspec.json.Decoder(_Header)
_SNAPSHOT: Final = msgspec.json.Decoder(_StateFile)
_LINE: Final = msgspec.json.Decoder(SetRecord | DelRecord | list[SetRecord | DelRecord])


@dataclass(frozen=True, slots=True)
class StateFile:
    """What `load_state` found."""

    entries: list[StateEntry]  # the replayed subscriptions, in list order per event
    version: int
    records: int  # subscriptions in the snapshot + changes in the journal
    journal_lines: int
    torn: bool  # the last line was incomplete (ignored)
    appendable: bool  # version 2, ending with a whole line

    @property
    def compact(self) -> bool:
        """A version-2 snapshot alone: nothing to replay, nothing to tidy."""
        return self.appendable and not self.journal_lines


def load_state(path: str) -> StateFile | None:
    """Read and replay the file; None when it does not exist.

    Raises StateFileError for anything else than a valid version-1 file or a
    valid version-2 file (whose last line may be incomplete: see the module)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(path, f"cannot read it: {exc.strerror or exc}") from None
    end = data.find(b"\n")
    head = data if end < 0 else data[:end]
    try:
        version: int | None = _HEADER.decode(head).version
    except msgspec.DecodeError:
        version = None  # a version-1 file over several lines, or corrupt
    if version is None or version == 1:
        return _load_v1(path, data)
    if version != STATE_VERSION:
        raise StateFileError(path, _unsupported(version))
    try:
        snapshot = _SNAPSHOT.decode(head).subscriptions
    except msgspec.DecodeError as exc:
        raise StateFileError(path, f"corrupt: line 1: {exc}") from None
    _check_finite(path, snapshot, "line 1: `$.subscriptions[{}].subscribed_at`")
    table = {(e.event, e.socket, e.filter): e for e in snapshot}
    lines = data[end + 1 :].split(b"\n") if end >= 0 else [b""]
    tail = lines.pop()  # after the last newline: b"" unless an append was torn
    records = len(snapshot)
    for number, line in enumerate(lines, start=2):
        try:
            decoded = _LINE.decode(line)
        except msgspec.DecodeError as exc:
            raise StateFileError(path, f"corrupt: line {number}: {exc}") from None
        changes = decoded if isinstance(decoded, list) else [decoded]
        at = "`$[{}].subscribed_at`" if isinstance(decoded, list) else "`$.subscribed_at`"
        _check_finite(path, changes, f"line {number}: {at}")
        records += len(changes)
        for change in changes:
            if isinstance(change, SetRecord):
                table[(change.event, change.socket, change.filter)] = StateEntry(
                    change.event,
                    change.socket,
                    change.expire,
                    change.subscribed_at,
                    change.filter,
                )
            else:
                table.pop((change.event, change.socket, change.filter), None)
    if tail:
        log.warning(
            "state file %s: ignored its incomplete last line (%d bytes at line %d): a change "
            "interrupted while it was written, never answered",
            path, len(tail), len(lines) + 2,
        )  # fmt: skip
    appendable = data.endswith(b"\n")  # not when the snapshot lacks its newline
    return StateFile(list(table.values()), version, records, len(lines), bool(tail), appendable)


def read_state(path: str) -> list[StateEntry] | None:
    """The replayed entries (see `load_state`), or None when the file does not exist."""
    state = load_state(path)
    return None if state is None else state.entries


def _load_v1(path: str, data: bytes) -> StateFile:
    try:
        version = _HEADER.decode(data).version
        if version != 1:
            raise StateFileError(path, _unsupported(version))
        entries = _SNAPSHOT.decode(data).subscriptions
    except msgspec.DecodeError as exc:
        raise StateFileError(path, f"corrupt: {exc}") from None
    _check_finite(path, entries, "`$.subscriptions[{}].subscribed_at`")
    return StateFile(entries, 1, len(entries), 0, False, False)


def _unsupported(version: int) -> str:
    return f"unsupported version {version} (this engine reads 1 and {STATE_VERSION})"


def _check_finite(path: str, items: Sequence[StateEntry | Record], where: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, DelRecord) and not math.isfinite(item.subscribed_at):
            at = where.format(i)
            raise StateFileError(path, f"corrupt: subscribed_at is not finite - at {at}")


def write_state(path: str, entries: list[StateEntry]) -> None:
    """Replace the file atomically with a snapshot of ``entries`` (an empty journal);
    raise StateFileError on failure."""
    data = _ENCODER.encode(_StateFile(STATE_VERSION, entries)) + b"\n"
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


def journal_line(records: Sequence[Record]) -> bytes:
    """One journal line: the record, or an array of them (made durable together)."""
    return _ENCODER.encode(records[0] if len(records) == 1 else list(records)) + b"\n"


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
        # Appending needs a version-2 file we read or wrote that ends with a whole
        # line; otherwise (and after a failed append) the next change is a snapshot.
        self._appendable = False
        self.records = 0  # in the file: snapshot entries + journal changes
        self.journal_lines = 0

    def read(self) -> StateFile | None:
        try:
            state = load_state(self.path)
        except StateFileError as exc:
            self._refusal = exc
            raise
        self._refusal, self._owned = None, True
        self._appendable = state is not None and state.appendable
        self.records = 0 if state is None else state.records
        self.journal_lines = 0 if state is None else state.journal_lines
        return state

    def _check_writable(self) -> None:
        if self._refusal is not None:
            reason = f"not overwriting it ({self._refusal.reason}); fix it, then load() again"
            raise StateFileError(self.path, reason)
        if not self._owned and os.path.lexists(self.path):
            raise StateFileError(self.path, "exists but was not loaded; call load() first")

    def write(self, entries: list[StateEntry]) -> None:
        """A new snapshot of ``entries``, atomically (the journal starts empty)."""
        self._check_writable()
        self._appendable = False  # until the new snapshot is surely in place
        write_state(self.path, entries)
        self._owned, self._appendable = True, True
        self.records, self.journal_lines = len(entries), 0

    def commit(
        self,
        records: Sequence[Record],
        snapshot: Callable[[], list[StateEntry]],
        live: int,
        *,
        compact: bool = False,
    ) -> None:
        """Make ``records`` durable before returning: appended (and fsynced) as one
        journal line, or, when the file cannot be appended to, when ``compact`` is
        asked or when more than half the file would be dead (more records than
        twice the ``live`` subscriptions after them), by writing ``snapshot()``
        (the state after them) atomically. Raises StateFileError."""
        self._check_writable()
        if compact or not self._appendable or self.records + len(records) > 2 * live:
            self.write(snapshot())
            return
        try:
            self._append(journal_line(records))
        except FileNotFoundError:  # removed behind our back: write it anew
            self.write(snapshot())
            return
        self.records += len(records)
        self.journal_lines += 1

    def commit_quietly(
        self, records: Sequence[Record], snapshot: Callable[[], list[StateEntry]], live: int
    ) -> None:
        """Best effort, for removals of expired entries (a reload drops those anyway)."""
        if self._refusal is None:
            try:
                self.commit(records, snapshot, live)
            except StateFileError as exc:
                log.warning("%s", exc)

    def write_quietly(self, entries: list[StateEntry]) -> None:
        """Best effort (a tidier file at load)."""
        if self._refusal is None:
            try:
                self.write(entries)
            except StateFileError as exc:
                log.warning("%s", exc)

    def _append(self, line: bytes) -> None:
        """Append ``line`` and fsync it. On failure the file is cut back to where it
        was (so no half line stays before the next one) and the next change is
        a snapshot either way. Raises FileNotFoundError, StateFileError."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise StateFileError(self.path, f"cannot write it: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            self._appendable = False
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise StateFileError(self.path, f"cannot write it: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
