"""How `event-datagram run` logs: level and format (`[log]`, --log-level, --log-format).

Every line on stderr goes through one handler, the ready line included, so every
line has a timestamp -- except under journald (`JOURNAL_STREAM` names our
stderr), which stamps each line itself. "json" writes one object per line:
{"time", "level", "logger", "message"} (no "time" under journald).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Final, Literal, TextIO

import msgspec

LogFormat = Literal["text", "json"]
LEVELS: Final = ("debug", "info", "warning", "error")

log = logging.getLogger("event_datagram")
WORKER_ENV: Final = "EVENT_DATAGRAM_LOG"


def under_journald(stream: TextIO) -> bool:
    """True when systemd connected `stream` to the journal (JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JsonFormatter(logging.Formatter):
    def __init__(self, stamp: bool) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str] = {}
        if self.stamp:
            ms = int(record.msecs)
            out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            out["time"] += f".{ms:03d}Z"
        out["level"] = record.levelname
        out["logger"] = record.name
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        out["message"] = message
        return msgspec.json.encode(out).decode()


def formatter(fmt: LogFormat, stamp: bool) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(stamp)
    text = "%(levelname)s %(name)s: %(message)s"
    return logging.Formatter(f"%(asctime)s {text}" if stamp else text)


def setup(level: str = "info", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers by one on `stream` (stderr)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt, stamp=not under_journald(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level, fmt)


def set_level(level: str, fmt: LogFormat | None = None) -> None:
    logging.getLogger().setLevel(level.upper())
    # Workers (started from now on) log alike: workers/logs.py reads this.
    current = os.environ.get(WORKER_ENV, "text:").partition(":")[0]
    os.environ[WORKER_ENV] = f"{fmt or current}:{level.upper()}"


def announce(message: str, level: int = logging.INFO) -> None:
    """A line the operator must see whatever the level (the ready line, a fatal
    error): formatted like every other line, written even below the level."""
    record = log.makeRecord(log.name, level, __file__, 0, message, (), None)
    root = logging.getLogger()
    if not root.handlers:
        print(message, file=sys.stderr, flush=True)
        return
    for handler in root.handlers:
        handler.handle(record)
