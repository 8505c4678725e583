"""The state file's journal (engine/state.py) and how the registry uses it: one
fsynced line per change, replay, compaction, a torn last line, corruption refused.

Real files under tmp_path; the only stand-ins are a settable clock and, to make
a write fail, a failing os.fsync.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from engine.state import (
    DelRecord,
    SetRecord,
    StateEntry,
    StateStore,
    journal_line,
    load_state,
    read_state,
    write_state,
)
from engine.subscriptions import Change, Registry, StateFileError
from tests.helpers.support import Clock

T0 = 1_767_225_600.0


ENTRY_1 = {"event": "E_A", "socket": "udp:127.0.0.1:1", "expire": 60, "subscribed_at": T0}


def entry(socket: str, expire: int = 60, at: float = T0, event: str = "E_A") -> StateEntry:
    return StateEntry(event, socket, expire, at)


def registry(path: Path, clock: Clock | None = None, **kw: object) -> Registry:
    reg = Registry(state_file=path, clock=clock or Clock(), **kw)  # type: ignore[arg-type]
    reg.register_event("E_A")
    reg.register_event("E_B")
    return reg


def lines(path: Path) -> list[object]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def sockets(path: Path) -> list[str]:
    return [e.socket for e in read_state(str(path)) or []]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- replay -----------------------------------------------------------------------------


def test_replay_applies_the_journal_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state(str(path), [entry("udp:127.0.0.1:1"), entry("udp:127.0.0.1:2")])
    append(path, journal_line([SetRecord("E_A", "udp:127.0.0.1:3", 60, T0 + 1)]))
    append(path, journal_line([SetRecord("E_A", "udp:127.0.0.1:1", 90, T0 + 2)]))  # refresh
    append(path, journal_line([DelRecord("E_A", "udp:127.0.0.1:2")]))
    append(path, journal_line([SetRecord("E_B", "udp:127.0.0.1:2", 5, T0 + 3)]))
    append(  # a sweep: several changes in one line, made durable together
        path,
        journal_line(
            [DelRecord("E_A", "udp:127.0.0.1:3"), SetRecord("E_A", "udp:127.0.0.1:3", 7, T0 + 4)]
        ),
    )
    append(path, journal_line([DelRecord("E_B", "udp:127.0.0.1:9")]))  # gone already: nothing
    state = load_state(str(path))
    assert state is not None
    assert state.entries == [
        entry("udp:127.0.0.1:1", 90, T0 + 2),  # refreshed in its place
        entry("udp:127.0.0.1:2", 5, T0 + 3, "E_B"),
        entry("udp:127.0.0.1:3", 7, T0 + 4),  # removed, then new: last
    ]
    assert (state.version, state.journal_lines, state.records, state.torn) == (2, 6, 9, False)
    assert not state.compact


def test_a_registry_restores_what_the_journal_says(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    reg = registry(path)
    for port in range(9000, 9010):
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", 60)
    reg.subscribe("E_B", "udp:127.0.0.1:9000", 30)
    reg.subscribe("E_A", "udp:127.0.0.1:9003", 120)  # refreshed: same place
    reg.unsubscribe("E_A", "udp:127.0.0.1:9005")
    reg.subscribe("E_A", "udp:127.0.0.1:9005", 60)  # new again: newest
    assert len(path.read_bytes().splitlines()) == 14  # a snapshot, then 13 changes
    again = registry(path)
    assert again.load() == 11
    want = {e: [(s.dest.key, s.expire) for s in reg.subscribers(e)] for e in ("E_A", "E_B")}
    got = {e: [(s.dest.key, s.expire) for s in again.subscribers(e)] for e in ("E_A", "E_B")}
    assert got == want
    assert want["E_A"][:2] == [("udp:127.0.0.1:9005", 60), ("udp:127.0.0.1:9009", 60)]
    # load() compacted the file into one snapshot line, in list order
    (snapshot,) = lines(path)
    assert isinstance(snapshot, dict) and snapshot["version"] == 2
    assert len(snapshot["subscriptions"]) == 11


def test_every_change_is_fsynced_before_it_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    reg = registry(path)
    reg.subscribe("E_A", "udp:127.0.0.1:8999", 60)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    for i in range(50):
        size = path.stat().st_size
        reg.subscribe("E_A", f"udp:127.0.0.1:{9000 + i}", 60)
        # the line is on disk (fsynced, whole) when subscribe() returns
        assert synced[-1] == path.stat().st_size > size
    assert len(synced) == 50  # one fsync per change: nothing rewritten
    reg.unsubscribe("E_A", "udp:127.0.0.1:9000")
    assert synced[-1] == path.stat().st_size and len(synced) == 51


def test_a_version_1_file_is_read_and_rewritten_as_version_2_at_load(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    doc = {
        "version": 1,
        "subscriptions": [
            {"event": "E_A", "socket": "udp:127.0.0.1:9000", "expire": 60, "subscribed_at": T0}
        ],
    }
    path.write_text(json.dumps(doc, indent=1))  # as version 1 wrote it: several lines
    reg = registry(path, Clock(T0 + 1))
    assert reg.load() == 1
    assert lines(path) == [{**doc, "version": 2}]
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 60)
    assert sockets(path) == ["udp:127.0.0.1:9000", "udp:127.0.0.1:9001"]


# -- compaction --------------------------------------------------------------------------


def test_refreshes_keep_the_file_proportional_to_the_live_subscriptions(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    clock = Clock()
    reg = registry(path, clock)
    for port in range(9000, 9100):
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", 60)
    snapshots = 0
    for i in range(2000):
        clock.t += 0.01
        before = path.stat().st_ino
        reg.subscribe("E_A", f"udp:127.0.0.1:{9000 + i % 100}", 60)
        snapshots += path.stat().st_ino != before  # a snapshot replaces the file
        state = load_state(str(path))
        assert state is not None and state.records <= 2 * 100
    # a snapshot every ~100 changes (when half the file is dead), never every change
    assert 15 <= snapshots <= 25
    assert sorted(sockets(path)) == sorted(f"udp:127.0.0.1:{p}" for p in range(9000, 9100))


def test_store_compacts_when_more_than_half_the_file_is_dead(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(str(path))
    assert store.read() is None
    live = [entry("udp:127.0.0.1:1")]
    made: list[int] = []

    def snapshot() -> list[StateEntry]:
        made.append(len(live))
        return list(live)

    store.commit([SetRecord("E_A", "udp:127.0.0.1:1", 60, T0)], snapshot, 1)
    assert made == [1]  # no file yet: a snapshot
    store.commit([SetRecord("E_A", "udp:127.0.0.1:1", 60, T0 + 1)], snapshot, 1)
    assert made == [1] and store.records == 2  # 2 records, 1 live: appended
    live = [entry("udp:127.0.0.1:1", at=T0 + 2)]
    store.commit([SetRecord("E_A", "udp:127.0.0.1:1", 60, T0 + 2)], snapshot, 1)
    assert made == [1, 1] and store.records == 1 and store.journal_lines == 0
    store.commit([DelRecord("E_A", "udp:127.0.0.1:7")], snapshot, 1, compact=True)
    assert made == [1, 1, 1]
    assert lines(path) == [{"version": 2, "subscriptions": [{**ENTRY_1, "subscribed_at": T0 + 2}]}]


def test_sweeping_many_at_once_is_one_line_or_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    clock = Clock()
    reg = registry(path, clock)
    for port in range(9000, 9030):
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", 10 if port < 9005 else 3600)
    count = len(path.read_bytes().splitlines())
    clock.t += 10
    assert len(reg.sweep()) == 5
    data = path.read_bytes().splitlines()
    assert len(data) == count + 1  # five removals, one line, one fsync
    assert json.loads(data[-1]) == [
        {"op": "del", "event": "E_A", "socket": f"udp:127.0.0.1:{p}"} for p in range(9000, 9005)
    ]
    clock.t += 3600
    assert len(reg.sweep()) == 25
    assert lines(path) == [{"version": 2, "subscriptions": []}]  # nothing live: compacted


# -- a torn last line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        b'{"op":"set","event":"E_A","socket":"udp:127.0.0.1:9001","expi',
        b'{"op":"del","event":"E_A","socket":"udp:127.0.0.1:9000"}',  # all but its newline
        b"\x00\x00\x00\x00\x00\x00",  # the size grew, the data never made it
        b"[",
    ],
)
def test_a_torn_last_line_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: bytes
) -> None:
    path = tmp_path / "state.json"
    reg = registry(path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    reg.subscribe("E_A", "udp:127.0.0.1:9002", 60)
    append(path, tail)  # a crash in the middle of the next append
    with caplog.at_level(logging.WARNING, logger="engine.state"):
        state = load_state(str(path))
    assert state is not None and state.torn and not state.appendable
    assert [e.socket for e in state.entries] == ["udp:127.0.0.1:9000", "udp:127.0.0.1:9002"]
    (record,) = [r for r in caplog.records if "incomplete last line" in r.getMessage()]
    assert str(path) in record.getMessage() and "line 3" in record.getMessage()
    # load() compacts it away; later changes are appended after whole lines only
    again = registry(path)
    assert again.load() == 2
    assert len(lines(path)) == 1
    again.subscribe("E_A", "udp:127.0.0.1:9003", 60)
    assert sockets(path) == ["udp:127.0.0.1:9000", "udp:127.0.0.1:9002", "udp:127.0.0.1:9003"]


def test_after_a_torn_line_the_next_change_is_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state(str(path), [entry("udp:127.0.0.1:1")])
    append(path, b'{"op":"del"')
    store = StateStore(str(path))
    assert store.read() is not None
    record = SetRecord("E_A", "udp:127.0.0.1:1", 60, T0 + 2)
    store.commit([record], lambda: [entry("udp:127.0.0.1:1", at=T0 + 2)], 1)
    assert lines(path) == [{"version": 2, "subscriptions": [{**ENTRY_1, "subscribed_at": T0 + 2}]}]


def test_a_snapshot_without_its_newline_is_not_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version":2,"subscriptions":[]}')  # not written by us: no newline
    reg = registry(path)
    assert reg.load() == 0
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    assert sockets(path) == ["udp:127.0.0.1:9000"]


# -- corruption is refused, and the file left alone -------------------------------------------

_ENTRY = b'"event":"E_A","socket":"udp:127.0.0.1:900%d","expire":60,"subscribed_at":1767225600.0'
SNAPSHOT = b'{"version":2,"subscriptions":[{' + _ENTRY % 0 + b"}]}\n"
SET = b'{"op":"set",' + _ENTRY % 1 + b"}\n"
CORRUPT = {
    "bad-middle-line": (SNAPSHOT + b"garbage\n" + SET, "line 2"),
    "bad-whole-last-line": (SNAPSHOT + SET + b'{"op":"set"}\n', "line 3"),
    "unknown-op": (SNAPSHOT + b'{"op":"put","event":"E_A","socket":"x"}\n', "line 2"),
    "unknown-field": (
        SNAPSHOT + b'{"op":"del","event":"E_A","socket":"udp:127.0.0.1:9000","x":1}\n',
        "unknown field `x`",
    ),
    "bad-expire": (SNAPSHOT + SET.replace(b'"expire":60', b'"expire":0'), "`$.expire`"),
    "bad-event": (SNAPSHOT + SET.replace(b'"E_A"', b'"E A"'), "`$.event`"),
    "infinite-time": (SNAPSHOT + SET.replace(b"1767225600.0", b"1e999"), "line 2: Number"),
    "infinite-time-in-a-batch": (
        SNAPSHOT + b"[" + SET.strip().replace(b"1767225600.0", b"1e999") + b"]\n",
        "`$[0].subscribed_at`",
    ),
    "empty-line": (SNAPSHOT + b"\n" + SET, "line 2"),
    "bad-snapshot": (SNAPSHOT.replace(b'"expire":60', b'"expire":"60"') + SET, "line 1"),
    "version-3-with-a-journal": (
        SNAPSHOT.replace(b'"version":2', b'"version":3') + SET,
        "unsupported version 3",
    ),
    "snapshot-version-1-with-a-journal": (
        SNAPSHOT.replace(b'"version":2', b'"version":1') + SET,
        "corrupt",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_journal_is_refused_and_never_overwritten(tmp_path: Path, case: str) -> None:
    content, reason = CORRUPT[case]
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError) as info:
        load_state(str(path))
    assert str(path) in str(info.value) and reason in str(info.value)
    reg = registry(path)
    with pytest.raises(StateFileError):
        reg.load()
    with pytest.raises(StateFileError, match="not overwriting"):
        reg.subscribe("E_A", "udp:127.0.0.1:9005", 60)
    assert reg.subscribers("E_A") == []
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == ["state.json"]


# -- failures leave the registry and the file as they were ------------------------------------


@pytest.fixture
def failing_fsync(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Set `failing_fsync[0] = True` and the next fsync fails with EIO."""
    armed = [False]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if armed[0]:
            armed[0] = False
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return armed


def test_a_failed_append_is_undone_in_the_file_and_the_registry(
    tmp_path: Path, failing_fsync: list[bool]
) -> None:
    path = tmp_path / "state.json"
    changes: list[Change] = []
    reg = registry(path, on_change=changes.append)
    for port in (9000, 9001, 9002):
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", 60)
    order = [s.dest.key for s in reg.subscribers("E_A")]
    del changes[:]
    for action in (
        lambda: reg.unsubscribe("E_A", "udp:127.0.0.1:9001"),  # from the middle
        lambda: reg.subscribe("E_A", "udp:127.0.0.1:9001", 5),  # a refresh
        lambda: reg.subscribe("E_A", "udp:127.0.0.1:9003", 60),  # a new one
        lambda: reg.unsubscribe("E_A", "udp:127.0.0.1:9001"),  # now as a snapshot
    ):
        content = path.read_bytes()
        failing_fsync[0] = True
        with pytest.raises(StateFileError, match="Input/output error"):
            action()
        assert [s.dest.key for s in reg.subscribers("E_A")] == order  # nothing moved
        assert reg.find("E_A", "udp:127.0.0.1:9001").expire == 60  # type: ignore[union-attr]
        assert path.read_bytes() == content  # a half-made line is cut off again
        assert os.listdir(tmp_path) == ["state.json"]
        assert changes == []
        if len(content.splitlines()) > 1:
            reg.save()  # the next change would be a snapshot anyway: make it an append
    # and it works again afterwards
    reg.unsubscribe("E_A", "udp:127.0.0.1:9001")
    assert sockets(path) == ["udp:127.0.0.1:9000", "udp:127.0.0.1:9002"]
    assert registry(path).load() == 2


def test_a_failed_sweep_write_is_logged_and_the_next_change_rewrites_the_file(
    tmp_path: Path, failing_fsync: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    clock = Clock()
    reg = registry(path, clock)
    for port in range(9000, 9010):
        reg.subscribe("E_A", f"udp:127.0.0.1:{port}", 5 if port == 9000 else 60)
    clock.t += 5
    failing_fsync[0] = True
    with caplog.at_level(logging.WARNING, logger="engine.state"):
        assert len(reg.sweep()) == 1  # removed anyway: it expired
    assert any("Input/output error" in r.getMessage() for r in caplog.records)
    assert "udp:127.0.0.1:9000" in sockets(path)  # still in the file (a reload drops it)
    reg.subscribe("E_A", "udp:127.0.0.1:9010", 60)
    assert len(lines(path)) == 1  # a snapshot, without the expired one
    assert sockets(path) == [f"udp:127.0.0.1:{p}" for p in range(9001, 9011)]


def test_a_file_removed_behind_its_back_is_written_anew(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    reg = registry(path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
    path.unlink()
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 60)
    assert sockets(path) == ["udp:127.0.0.1:9000", "udp:127.0.0.1:9001"]


def test_static_to_expiring_keeps_its_place_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    reg = registry(path)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", None)  # static, from the config say
    reg.subscribe("E_A", "udp:127.0.0.1:9001", 60)
    reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)  # now expiring, in its place
    keys = [s.dest.key for s in reg.subscribers("E_A")]
    assert keys == ["udp:127.0.0.1:9001", "udp:127.0.0.1:9000"]
    again = registry(path)
    again.load()
    assert [s.dest.key for s in again.subscribers("E_A")] == keys


def test_carried_entries_survive_compaction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    write_state(str(path), [entry("udp:127.0.0.1:9000"), entry("unix:/run/elsewhere.sock")])
    reg = registry(path)
    with caplog.at_level(logging.WARNING):
        assert reg.load() == 1  # /run/ is not allowed by default: carried
    snapshots = 0
    for _ in range(10):
        before = path.stat().st_ino
        reg.subscribe("E_A", "udp:127.0.0.1:9000", 60)
        snapshots += path.stat().st_ino != before
        assert sockets(path) == ["udp:127.0.0.1:9000", "unix:/run/elsewhere.sock"]
    assert snapshots >= 3  # counted as live, and in every snapshot
