"""A broker URL that carries a password, from the config, a file or the environment
(issue 17, item 7): `[[amqp]]` and `[[stream]]` take it the same way.

Exactly one of KEY, KEY_file, KEY_env is set (KEY at its default counts as unset).
Every error names the key and the file or variable, never the URL: it holds the
password.
"""

from __future__ import annotations

import os
from typing import Final, NamedTuple

MAX_FILE_BYTES: Final = 65536  # more than any URL: a secret file is never read whole


class SecretUrl(NamedTuple):
    """The three keys of one URL: `prefix` + url, url_file, url_env."""

    prefix: str  # "" for url, "amqp_" for amqp_url...
    url: str
    url_file: str
    url_env: str
    default: str = ""  # the url key's default value, not counted as "set"

    @property
    def key(self) -> str:
        """The key the URL comes from (the one an error is reported at)."""
        name = "url_file" if self.url_file else "url_env" if self.url_env else "url"
        return self.prefix + name

    def conflict(self) -> tuple[str, str] | None:
        """(key, why) when more than one of the three keys is set, else None."""
        given = [self.prefix + k for k in ("url_file", "url_env") if getattr(self, k)]
        if given and self.url not in ("", self.default):
            given.insert(0, self.prefix + "url")
        if len(given) < 2:
            return None
        keys = ", ".join(self.prefix + k for k in ("url", "url_file", "url_env"))
        return given[-1], f"set one of {keys}, not {' and '.join(given)}"

    def value(self) -> str:
        """The URL: the first non-blank line of url_file, url_env's value, or url.

        Raises:
            ValueError: saying why (unreadable, empty, unset), never with the URL.
        """
        if self.url_file:
            try:
                with open(self.url_file, encoding="utf-8") as f:
                    lines = f.read(MAX_FILE_BYTES).strip().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or type(exc).__name__
                raise ValueError(f"cannot read {self.url_file!r}: {why}") from None
            if not lines or not lines[0].strip():
                raise ValueError(f"{self.url_file!r} is empty: expected the broker URL")
            return lines[0].strip()
        if self.url_env:
            url = os.environ.get(self.url_env, "").strip()
            if not url:
                raise ValueError(f"the environment variable {self.url_env} is not set or empty")
            return url
        return self.url


def redact(url: str) -> str:
    """The URL with its credentials as ***."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split('://', 1)[0]}://***@{tail}" if sep else url
