"""A worker's log lines look like the main process's (engine/cli/logs.py):
`run` sets EVENT_DATAGRAM_LOG=FORMAT:LEVEL ("text:INFO", "json:WARNING") in the
environment the workers inherit; a timestamp unless stderr is the journal
(JOURNAL_STREAM). Kept to the standard library: workers import engine.shm only."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ENV = "EVENT_DATAGRAM_LOG"


def _under_journald() -> bool:
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _Json(logging.Formatter):
    def __init__(self, stamp: bool) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str] = {}
        if self.stamp:
            out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            out["time"] += f".{int(record.msecs):03d}Z"
        out.update(level=record.levelname, logger=record.name, message=record.getMessage())
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def setup() -> None:
    """Configure the root logger from EVENT_DATAGRAM_LOG; without it, leave Python's default."""
    fmt, _, level = os.environ.get(ENV, "").partition(":")
    if fmt not in ("text", "json"):
        return
    stamp = not _under_journald()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json(stamp))
    else:
        text = "%(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s {text}" if stamp else text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "WARNING")
