"""Where the engine keeps its files when the config does not say.

Two kinds, as systemd and the XDG base directories separate them:

- runtime files (the instance lock, UNIX sockets, FIFOs), gone at reboot:
  `$RUNTIME_DIRECTORY` (systemd's RuntimeDirectory=), else
  `$XDG_RUNTIME_DIR/event-datagram`, else `/run/event-datagram` as root,
  else `/tmp/event-datagram`;
- state (the subscriptions file), which must survive a reboot:
  `$STATE_DIRECTORY` (systemd's StateDirectory=), else
  `/var/lib/event-datagram` as root, else `$XDG_STATE_HOME/event-datagram`
  (`~/.local/state/event-datagram`).

Before 0.2 the state file lived in the runtime directory (`/tmp` for root and
services): `migrate_state` moves one found there, so an upgrade keeps the
subscriptions.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Final

log = logging.getLogger("event_datagram.paths")

NAME: Final = "event-datagram"


def _systemd_dir(variable: str) -> str | None:
    """systemd sets e.g. STATE_DIRECTORY to the absolute paths of every
    StateDirectory=, separated by ':'; the first one is ours."""
    value = os.environ.get(variable, "")
    first = value.split(":", 1)[0]
    return first if first.startswith("/") else None


def _is_root() -> bool:
    return os.geteuid() == 0


def runtime_dir() -> str:
    """The default runtime directory (see the module's docstring)."""
    systemd = _systemd_dir("RUNTIME_DIRECTORY")
    if systemd:
        return systemd
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/"):
        return os.path.join(xdg, NAME)
    return os.path.join("/run" if _is_root() else "/tmp", NAME)


def state_dir() -> str:
    """The default state directory (see the module's docstring)."""
    systemd = _systemd_dir("STATE_DIRECTORY")
    if systemd:
        return systemd
    if _is_root():
        return os.path.join("/var/lib", NAME)
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if not xdg.startswith("/"):
        xdg = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, NAME)


def legacy_runtime_dirs() -> list[str]:
    """Where 0.1 put its runtime directory, and so its default state file."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    first = os.path.join(xdg, NAME) if xdg.startswith("/") else os.path.join("/tmp", NAME)
    return list(dict.fromkeys([first, os.path.join("/tmp", NAME)]))


def migrate_state(path: str, old_paths: list[str]) -> str | None:
    """Move the first existing file of `old_paths` to `path` when `path` does not
    exist yet. Returns the old path moved, or None. A move that fails is logged
    (with both paths, so an operator can do it) and the engine starts without it."""
    if os.path.exists(path):
        return None
    for old in old_paths:
        if os.path.abspath(old) == os.path.abspath(path) or not os.path.isfile(old):
            continue
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            shutil.move(old, path)  # a rename, or a copy then unlink across filesystems
        except OSError as exc:
            log.warning(
                "a state file of an older version is at %s; it could not be moved to %s (%s): "
                "move it there while the engine is stopped to keep its subscriptions",
                old, path, exc.strerror or exc,
            )  # fmt: skip
            return None
        log.warning("moved the state file of an older version from %s to %s", old, path)
        return old
    return None
