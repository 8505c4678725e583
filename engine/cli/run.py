"""What ``event-datagram run`` runs: the engine from a Config, and its MI listeners.

Start order: the engine (with the config's events, static subscriptions and
allow-list; the state file is loaded by ``Engine.start``), then the sources
(datagram ingest, then the upstreams, which subscribe the ingest socket at
their OpenSIPS MI in threads of their own, never holding up the start, then
the broker queues, each consumed in a thread of its own), then the MI
listeners. Stop order is the reverse: the MI stops taking requests, the
upstreams unsubscribe (about a second at most, for MIs that do not answer),
the broker sources acknowledge what they raised and close, the ingest stops
reading, then the engine drains its rings and frees its shared memory.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

from engine.address import AddressError, parse_listen
from engine.config import AmqpConfig, Config, IngestConfig, UpstreamConfig
from engine.errors import ConfigError, EngineError, RunError
from engine.mi.fifo import FifoServer
from engine.mi.server import DatagramServer, HTTPServer
from engine.paths import migrate_state
from engine.producer import Engine
from engine.shm.segment import lock_holder
from engine.sources.amqp import AmqpSource
from engine.sources.ingest import Ingest
from engine.sources.upstream import Upstream, stop_all
from engine.subscriptions import StateFileError, SubscriptionError

# What an upstream does: (mi, events, the socket it subscribes, expire).
UpstreamKey = tuple[str, tuple[str, ...], str, int]


class _Listener(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Runner:
    def __init__(self, config: Config, source: str = "the config") -> None:
        self.config = config
        self.source = source
        self.engine: Engine = None  # type: ignore[assignment]  # set by start()
        self.http: HTTPServer | None = None
        self.datagram: DatagramServer | None = None
        self.fifo: FifoServer | None = None
        self.ingest: Ingest | None = None
        self.upstreams: list[Upstream] = []
        self.upstream_keys: list[UpstreamKey] = []  # one per upstream, for reloads
        self.amqp: list[AmqpSource] = []
        self.amqp_configs: list[AmqpConfig] = []  # one per broker source, for reloads

    def start(self) -> None:
        """Start everything; on any failure stop what was started and raise
        ConfigError (bad static subscription) or RunError."""
        cfg = self.config
        state = cfg.state_path()
        if state is not None:
            os.makedirs(os.path.dirname(os.path.abspath(state)), mode=0o700, exist_ok=True)
            # Not while an engine of this instance runs (an older one, say): its file.
            if lock_holder(cfg.engine.resolved_runtime_dir(), cfg.engine.instance) is None:
                migrate_state(state, cfg.legacy_state_paths())
        try:
            self.engine = Engine(
                cfg.engine,
                events=cfg.events,
                allow=cfg.allow_list(),
                state_file=state,
                unknown_events=cfg.state.unknown_events,
            )
        except (ValueError, SubscriptionError) as exc:
            raise ConfigError(f"config error in {self.source}: {exc}") from None
        for i, sub in enumerate(cfg.subscription):
            try:
                self.engine.register_event(sub.event)
                self.engine.subscribe(sub.event, sub.socket, None)
            except (AddressError, SubscriptionError, ValueError) as exc:
                where = f"$.subscription[{i}]"
                raise ConfigError(f"config error in {self.source}: {exc} - at `{where}`") from None
        try:
            self.engine.start()
        except (EngineError, ValueError, OSError) as exc:
            raise RunError(f"cannot start the engine: {exc}") from None
        except StateFileError as exc:
            self.engine.stop()
            raise RunError(str(exc)) from None
        try:
            self._start_sources()
            self._start_listeners()
        except BaseException:
            self.stop()
            raise

    def _start_sources(self) -> None:
        self.start_ingest(self.config.ingest)
        for up in self.config.upstream:
            self.start_upstream(up)
        if self.config.amqp:
            self.check_amqp_extra()
        for cfg in self.config.amqp:
            self.start_amqp_source(cfg)

    def start_ingest(self, cfg: IngestConfig) -> None:
        if not cfg.listen:
            return
        try:
            self.ingest = Ingest(
                self.engine, cfg.listen, allow=cfg.allow, unknown_events=cfg.unknown_events
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise RunError(f"cannot listen for ingest on {cfg.listen}: {why}") from None
        self.engine.add_source(self.ingest)
        self.ingest.start()

    def stop_ingest(self) -> None:
        if self.ingest is not None:
            self.ingest.stop()
            self.engine.remove_source(self.ingest)
            self.ingest = None

    @staticmethod
    def check_amqp_extra() -> None:
        try:
            import pika  # noqa: F401  # the optional extra
        except ImportError:
            raise RunError(
                "[[amqp]] needs the amqp extra: pip install 'event-datagram[amqp]'"
            ) from None

    def start_amqp_source(self, cfg: AmqpConfig) -> AmqpSource:
        """Each [[amqp]] consumes in a thread of its own; a broker that is down is
        retried there, never waited for here."""
        source = AmqpSource(self.engine, cfg)
        self.amqp.append(source)
        self.amqp_configs.append(cfg)
        self.engine.add_source(source)
        source.start()
        return source

    def upstream_key(self, up: UpstreamConfig) -> UpstreamKey:
        """`socket` "" = the first ingest socket, as bound (port 0 is its real port)."""
        if self.ingest is None:  # Config.validate refuses this
            raise RunError(f"upstream {up.mi}: no ingest socket to subscribe")
        return (up.mi, tuple(up.events), up.socket or self.ingest.names[0], up.expire)

    def start_upstream(self, up: UpstreamConfig) -> Upstream:
        """Each [[upstream]] subscribes its socket in a thread of its own."""
        key = self.upstream_key(up)
        upstream = Upstream(self.engine, up.mi, up.events, key[2], up.expire)
        self.upstreams.append(upstream)
        self.upstream_keys.append(key)
        self.engine.add_source(upstream)
        upstream.start()
        return upstream

    def _start_listeners(self) -> None:
        cfg = self.config.mi
        http = parse_listen(cfg.http)
        datagram = parse_listen(cfg.datagram)
        if http is not None:
            try:
                per_subscriber = self.config.metrics.per_subscriber
                self.http = HTTPServer(self.engine, http, per_subscriber=per_subscriber)
            except OSError as exc:
                raise RunError(f"cannot listen on {cfg.http} (HTTP MI): {exc.strerror}") from None
        if datagram is not None:
            try:
                self.datagram = DatagramServer(self.engine, datagram)
            except OSError as exc:
                why = exc.strerror
                raise RunError(f"cannot listen on {cfg.datagram} (MI datagram): {why}") from None
        if cfg.fifo:
            try:
                self.fifo = FifoServer(self.engine, cfg.fifo, cfg.fifo_reply_dir)
            except OSError as exc:
                raise RunError(f"cannot create the MI FIFO {cfg.fifo}: {exc}") from None
        for listener in self._listeners():
            listener.start()

    def _listeners(self) -> list[_Listener]:
        return [x for x in (self.http, self.datagram, self.fifo) if x is not None]

    def stop(self) -> None:
        for listener in reversed(self._listeners()):
            with contextlib.suppress(Exception):
                listener.stop()
        self.http = self.datagram = self.fifo = None
        stop_all(self.upstreams)  # unsubscribe while the ingest still reads
        self.upstreams = []
        self.upstream_keys = []
        for source in self.amqp:  # each acknowledges what it raised, then closes
            source.stop()
        self.amqp = []
        self.amqp_configs = []
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        if self.engine is not None:
            self.engine.stop()

    def describe(self) -> str:
        """The ready line: where the MI and metrics are, and the engine's shape."""
        parts = []
        if self.http is not None:
            parts.append(f"mi {self.http.url}")
        if self.datagram is not None:
            parts.append(f"mi datagram {self.datagram.url}")
        if self.fifo is not None:
            parts.append(f"mi fifo {self.fifo.path}")
        if self.http is not None:
            parts.append(f"metrics {self.http.url.removesuffix('/mi')}/metrics")
        if self.ingest is not None:
            parts.append(f"ingest {' '.join(self.ingest.names)}")
        if self.upstreams:
            parts.append(f"upstream {' '.join(u.mi for u in self.upstreams)}")
        for source in self.amqp:
            parts.append(source.name)
        info = self.engine.describe()
        parts.append(f"{info['workers']} worker(s)")
        with self.engine.lock:
            parts.append(f"{len(self.engine.registry.events())} event(s)")
        parts.append(f"instance {info['instance']}")
        state = self.config.state_path()
        parts.append(f"state {state}" if state else "state off")
        return ", ".join(parts)
