"""engine/sources/stream_offsets.py: the engine's copy of a stored stream offset."""

from __future__ import annotations

from pathlib import Path

from engine.sources.stream_offsets import OffsetCopy


def copy(directory: Path | None, stream: str = "s", consumer: str = "c") -> OffsetCopy:
    return OffsetCopy(
        None if directory is None else str(directory), "inst", "src", stream, consumer
    )


def test_written_then_read_by_the_next_process(tmp_path: Path) -> None:
    first = copy(tmp_path / "run")  # the directory is made on the first write
    assert first.offset is None
    first.write(41)
    first.write(42)
    assert copy(tmp_path / "run").offset == 42
    assert [p.name for p in (tmp_path / "run").iterdir()] == [Path(first.path or "").name]
    (tmp_path / "run").chmod(0o700)


def test_another_stream_or_consumer_or_a_bad_file_tells_nothing(tmp_path: Path) -> None:
    mine = copy(tmp_path)
    mine.write(7)
    assert mine.path is not None
    other = OffsetCopy(str(tmp_path), "inst", "src", "other-stream", "c")
    assert other.path != mine.path and other.offset is None
    Path(mine.path).write_text('{"stream": "x", "consumer": "c", "offset": 7}')
    assert copy(tmp_path).offset is None  # same file name, not the same stream
    for text in ("not json", "[]", '{"stream": "s", "consumer": "c", "offset": -1}', ""):
        Path(mine.path).write_text(text)
        assert copy(tmp_path).offset is None


def test_without_a_directory_only_the_offset_is_kept() -> None:
    none = copy(None)
    none.write(3)
    assert none.path is None and none.offset == 3
