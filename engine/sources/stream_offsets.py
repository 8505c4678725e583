"""The engine's copy of a stream source's stored offset (one small file each).

RabbitMQ forgets a stored offset once retention has removed what it points to
(its offset tracking keeps nothing below the stream's first offset), so after a
long absence the broker alone cannot tell "never read" from "read, then away
for too long". The copy tells: the source then continues at the first message
retained, counting what it missed, instead of at its configured `offset`
("next": all of the retained backlog skipped). A hint only (written after each
store, atomically, without fsync): the broker's offset, when it has one, decides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

log = logging.getLogger("event_datagram.stream")


class OffsetCopy:
    """The copy for one (engine instance, source, stream, consumer name)."""

    def __init__(self, directory: str | None, instance: str, source: str, stream: str,
                 consumer: str) -> None:  # fmt: skip
        """`directory` None: nothing is kept (`offset` still tells what was last stored)."""
        key = hashlib.sha256(f"{source} {stream} {consumer}".encode()).hexdigest()[:16]
        self.path = (
            None
            if directory is None
            else os.path.join(directory, f"{instance}.stream-{key}.offset")
        )
        self._identity = {"stream": stream, "consumer": consumer}
        self.offset = self._read()

    def _read(self) -> int | None:
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as file:
                saved = json.loads(file.read())
            if all(saved.get(k) == v for k, v in self._identity.items()):
                offset = saved.get("offset")
                return offset if isinstance(offset, int) and offset >= 0 else None
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or not ours: the broker's offset (or `offset`) decides
        return None

    def write(self, offset: int) -> None:
        """Remember `offset` (a file write only when it changed)."""
        if offset == self.offset:
            return
        self.offset = offset
        if self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            temporary = f"{self.path}.tmp"
            with open(temporary, "w") as file:
                json.dump({**self._identity, "offset": offset}, file)
            os.replace(temporary, self.path)
        except OSError as exc:  # a hint only: the broker's offset is the truth
            log.debug("stream offset copy %s not written: %r", self.path, exc)
