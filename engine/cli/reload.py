"""SIGHUP: apply a new config file to a running `event-datagram run`.

A reload is a list of steps (`STEPS`), each owning some top-level keys of the
config and applying their new values to the running engine; a step that fails
leaves its keys at their running values (logged), the others still apply. A
config that does not load changes nothing. Keys no step owns (`RESTART_KEYS`)
need a restart: a change there is named in one log line and left as it runs.
The outcome is on /metrics as Prometheus's own reload metrics do it
(`event_datagram_config_last_reload_successful`, `..._success_timestamp_seconds`).

The web config files of the HTTP listeners (and their certificates) are read
again by the last step, whatever the config says: their paths are `mi` and
`metrics` keys, which need a restart, but their content is what operators
rotate. To reload something more, append a step: `Step(name, keys, apply)`
where `apply(runner, old, new)` raises on failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from engine.address import AddressError
from engine.cli import logs
from engine.config import Config, ConfigError
from engine.errors import RunError
from engine.sources.upstream import stop_all
from engine.subscriptions import SubscriptionError

if TYPE_CHECKING:
    from engine.cli.run import Runner, UpstreamKey
    from engine.sources.amqp import AmqpConfig, AmqpSource
    from engine.sources.upstream import Upstream

log = logging.getLogger("event_datagram.reload")

# Sections whose change needs a restart: the shared memory, the workers, the
# listeners (the MI, /metrics and what it shows), where the state lives, and the
# stream sources (their offsets are stored as they stop: a restart, not a reload).
RESTART_KEYS: Final = ("engine", "mi", "state", "metrics", "stream")


# What a step may raise for a reason to log in one line (anything else: a traceback).
EXPECTED: Final = (RunError, ConfigError, SubscriptionError, AddressError, ValueError, OSError)


@dataclass(frozen=True)
class Step:
    name: str
    keys: tuple[str, ...]  # the Config fields it applies
    apply: Callable[[Runner, Config, Config], None]  # (runner, running config, new config)


@dataclass
class ReloadStatus:
    """What /metrics says about reloads; the start counts as the first success."""

    successful: bool = True
    last_success: float = 0.0

    def __post_init__(self) -> None:
        self.last_success = self.last_success or time.time()


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys in RESTART_KEYS (as `section.key`) whose value differs."""
    out: list[str] = []
    for section in RESTART_KEYS:
        was, now = getattr(old, section), getattr(new, section)
        if isinstance(was, list):  # [[stream]]: named as a whole
            out += [section] if was != now else []
            continue
        before: dict[str, Any] = msgspec.structs.asdict(was)
        after: dict[str, Any] = msgspec.structs.asdict(now)
        out += [f"{section}.{k}" for k in before if before[k] != after.get(k)]
    return out


def reload(runner: Runner, load: Callable[[], Config], status: ReloadStatus) -> bool:
    """Load the config again and apply it; True when everything applied."""
    old = runner.config
    try:
        new = load()
    except ConfigError as exc:
        status.successful = False
        log.error("reload failed, the running config stays: %s", exc)
        return False
    restart = restart_needed(old, new)
    removed = [e for e in old.events if e not in new.events]
    if removed:
        restart.append(f"events (removed: {', '.join(removed)})")
    if restart:
        log.warning(
            "reload: these changes need a restart and are not applied: %s", ", ".join(restart)
        )
    keep = {section: getattr(old, section) for section in RESTART_KEYS}
    new = msgspec.structs.replace(new, **keep)
    failed: list[str] = []
    for step in STEPS:
        try:
            step.apply(runner, old, new)
        except Exception as exc:  # a reload never stops the engine
            failed.append(step.name)
            if isinstance(exc, EXPECTED):
                log.error("reload: %s not applied, it runs as before: %s", step.name, exc)
            else:
                log.exception("reload: %s not applied, it runs as before", step.name)
            new = msgspec.structs.replace(new, **{k: getattr(old, k) for k in step.keys})
        runner.config = msgspec.structs.replace(
            runner.config, **{k: getattr(new, k) for k in step.keys}
        )
    status.successful = not failed
    if failed:
        return False
    status.last_success = time.time()
    logs.announce(f"reloaded the config from {runner.source}")  # whatever the new level
    return True


# -- the steps, in order ------------------------------------------------------------------------


def _log(runner: Runner, old: Config, new: Config) -> None:
    if new.log.format != old.log.format:
        logs.setup(new.log.level, new.log.format)
    else:
        logs.set_level(new.log.level)


def _events(runner: Runner, old: Config, new: Config) -> None:
    added = [e for e in new.events if e not in old.events]
    for name in added:
        runner.engine.register_event(name)
    if added:
        log.info("reload: events added: %s", ", ".join(added))


def _allow(runner: Runner, old: Config, new: Config) -> None:
    if new.allow == old.allow and new.engine.runtime_dir == old.engine.runtime_dir:
        return
    refused = runner.engine.set_allow(new.allow_list())
    for event, socket in refused:
        log.warning("reload: %s unsubscribed from %s: not in the new allow-list", socket, event)


def _subscriptions(runner: Runner, old: Config, new: Config) -> None:
    before = {(s.event, s.socket) for s in old.subscription}
    after = [(s.event, s.socket) for s in new.subscription]
    engine = runner.engine
    for event, socket in before - set(after):
        engine.unsubscribe(event, socket)
    for event, socket in after:
        if (event, socket) not in before:
            engine.register_event(event)
            engine.subscribe(event, socket, None)


def _ingest(runner: Runner, old: Config, new: Config) -> None:
    if new.ingest == old.ingest:
        return
    if new.ingest.listen == old.ingest.listen and runner.ingest is not None:
        runner.ingest.set_policy(new.ingest.allow, new.ingest.unknown_events)  # sockets kept
        log.info("reload: ingest sources allowed: %s", new.ingest.allow or "loopback")
        return
    # Stop first: a socket kept in the new list is bound again on the same address.
    # What arrives between the two is refused by the kernel (a short gap, logged).
    runner.stop_ingest()
    try:
        runner.start_ingest(new.ingest)
    except RunError:
        runner.start_ingest(old.ingest)  # put back what ran
        raise
    log.info("reload: ingest now on %s", " ".join(runner.ingest.names) if runner.ingest else "-")


def _upstreams(runner: Runner, old: Config, new: Config) -> None:
    # Keyed by what the upstream does, its socket as it resolves now: an upstream
    # that sends to the first ingest socket follows an ingest change.
    wanted = {runner.upstream_key(cfg): cfg for cfg in new.upstream}
    kept: list[tuple[Upstream, UpstreamKey]] = []
    gone: list[Upstream] = []
    for upstream, key in zip(runner.upstreams, runner.upstream_keys, strict=True):
        if key in wanted:
            kept.append((upstream, key))
        else:
            gone.append(upstream)
    if gone:
        stop_all(gone)  # they unsubscribe at their MIs
        for upstream in gone:
            runner.engine.remove_source(upstream)
        log.info("reload: upstreams stopped: %s", " ".join(u.mi for u in gone))
    runner.upstreams = [u for u, _ in kept]
    runner.upstream_keys = [k for _, k in kept]
    added = [cfg for key, cfg in wanted.items() if key not in runner.upstream_keys]
    for cfg in added:
        runner.start_upstream(cfg)
    if added:
        log.info("reload: upstreams started: %s", " ".join(u.mi for u in added))


def _amqp(runner: Runner, old: Config, new: Config) -> None:
    kept: list[tuple[AmqpSource, AmqpConfig]] = []
    for source, cfg in zip(runner.amqp, runner.amqp_configs, strict=True):
        if cfg in new.amqp:
            kept.append((source, cfg))
            continue
        source.stop()  # acknowledges what it raised
        runner.engine.remove_source(source)
        log.info("reload: broker source stopped: %s", source.name)
    runner.amqp = [s for s, _ in kept]
    runner.amqp_configs = [c for _, c in kept]
    added = [c for c in new.amqp if c not in runner.amqp_configs]
    if added:
        runner.check_amqp_extra()
    for cfg in added:
        source = runner.start_amqp_source(cfg)
        log.info("reload: broker source started: %s", source.name)


def _web(runner: Runner, old: Config, new: Config) -> None:
    if not runner.reload_web_configs():  # each failed one is logged and keeps running
        raise RunError("a web config file did not load (see above); it runs as before")


STEPS: list[Step] = [
    Step("log", ("log",), _log),
    Step("events", ("events",), _events),
    Step("allow-list", ("allow",), _allow),
    Step("static subscriptions", ("subscription",), _subscriptions),
    Step("ingest", ("ingest",), _ingest),
    Step("upstreams", ("upstream",), _upstreams),
    Step("broker sources", ("amqp",), _amqp),
    Step("web configs and certificates", (), _web),
]
