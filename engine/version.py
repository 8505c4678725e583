"""The package's version and what it was built with (--version, build_info)."""

from __future__ import annotations

import platform
from importlib import metadata


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def version() -> str:
    return _dist_version("event-datagram")


def build() -> dict[str, str]:
    """The labels of event_datagram_build_info (and the `version` verb's line)."""
    return {
        "version": version(),
        "python": platform.python_version(),
        "msgspec": _dist_version("msgspec"),
    }
