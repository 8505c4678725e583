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
import logging
import os
from typing import Protocol

from engine.address import AddressError, parse_listen
from engine.config import Config
from engine.errors import ConfigError, EngineError, RunError
from engine.mi.fifo import FifoServer
from engine.mi.health import not_ready
from engine.mi.http import RequestPolicy, SecurityCounters, exposure_warning, is_loopback_bind
from engine.mi.server import DatagramServer, HTTPServer
from engine.mi.webconfig import WebConfig
from engine.producer import Engine
from engine.sources.amqp import AmqpSource
from engine.sources.ingest import Ingest
from engine.sources.stream import StreamSource
from engine.sources.upstream import Upstream, stop_all
from engine.subscriptions import StateFileError, SubscriptionError

log = logging.getLogger("event_datagram.run")


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
        self.metrics_http: HTTPServer | None = None  # [metrics] listen
        self.web_configs: list[WebConfig] = []  # reload() them on SIGHUP
        self.security = SecurityCounters()
        self._webs: dict[str, WebConfig | None] = {}
        self.datagram: DatagramServer | None = None
        self.fifo: FifoServer | None = None
        self.ingest: Ingest | None = None
        self.upstreams: list[Upstream] = []
        self.amqp: list[AmqpSource] = []
        self.streams: list[StreamSource] = []

    def start(self) -> None:
        """Start everything; on any failure stop what was started and raise
        ConfigError (bad static subscription) or RunError."""
        cfg = self.config
        # The web config files first: a bad one is a config error before anything starts.
        self._webs = {
            path: self._web_config(path) for path in (cfg.mi.web_config, cfg.metrics.web_config)
        }
        state = cfg.state_path()
        if state is not None:
            os.makedirs(os.path.dirname(os.path.abspath(state)), mode=0o700, exist_ok=True)
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
        cfg = self.config.ingest
        if cfg.listen:
            try:
                self.ingest = Ingest(
                    self.engine, cfg.listen, allow=cfg.allow, unknown_events=cfg.unknown_events
                )
            except OSError as exc:
                why = exc.strerror or str(exc)
                raise RunError(f"cannot listen for ingest on {cfg.listen}: {why}") from None
            self.engine.add_source(self.ingest)
            self.ingest.start()
        self._start_upstreams()
        self._start_amqp()
        self._start_streams()

    def _start_streams(self) -> None:
        """Each [[stream]] reads in a thread of its own (an asyncio loop); a broker
        that is down is retried there, never waited for here."""
        if self.config.stream:
            try:
                import rstream  # noqa: F401  # the optional extra
            except ImportError:
                raise RunError(
                    "[[stream]] needs the stream extra: pip install 'event-datagram[stream]'"
                ) from None
        for cfg in self.config.stream:
            source = StreamSource(
                self.engine,
                cfg,
                instance=self.config.engine.instance,
                offsets_dir=self.config.engine.resolved_runtime_dir(),
            )
            self.streams.append(source)
            self.engine.add_source(source)
            source.start()

    def _start_amqp(self) -> None:
        """Each [[amqp]] consumes in a thread of its own; a broker that is down is
        retried there, never waited for here."""
        if self.config.amqp:
            try:
                import pika  # noqa: F401  # the optional extra
            except ImportError:
                raise RunError(
                    "[[amqp]] needs the amqp extra: pip install 'event-datagram[amqp]'"
                ) from None
        for cfg in self.config.amqp:
            source = AmqpSource(self.engine, cfg)
            self.amqp.append(source)
            self.engine.add_source(source)
            source.start()

    def _start_upstreams(self) -> None:
        """Each [[upstream]] subscribes `socket` ("" = the first ingest socket, as
        bound: port 0 is its real port) in a thread of its own."""
        for up in self.config.upstream:
            if self.ingest is None:  # Config.validate refuses this
                raise RunError(f"upstream {up.mi}: no ingest socket to subscribe")
            socket = up.socket or self.ingest.names[0]
            upstream = Upstream(self.engine, up.mi, up.events, socket, up.expire)
            self.upstreams.append(upstream)
            self.engine.add_source(upstream)
            upstream.start()

    def _web_config(self, path: str) -> WebConfig | None:
        if not path:
            return None
        web = WebConfig(path)  # WebConfigError (a ConfigError) names the file and key
        self.web_configs.append(web)
        return web

    def _http_listener(
        self, text: str, what: str, web_path: str, *, mi: bool, metrics: bool
    ) -> HTTPServer | None:
        address = parse_listen(text)
        if address is None:
            return None
        web = self._webs.get(web_path) if web_path else None
        loopback = is_loopback_bind(address[0])
        cfg = self.config.mi
        try:
            server = HTTPServer(
                self.engine,
                address,
                per_subscriber=self.config.metrics.per_subscriber,
                web=web,
                policy=RequestPolicy.make(loopback, cfg.allowed_origins, cfg.allowed_hosts),
                serve_mi=mi,
                serve_metrics=metrics,
                ready=self.not_ready,
                security=self.security,
                name="mi" if mi else "metrics",
            )
        except OSError as exc:
            raise RunError(f"cannot listen on {text} ({what}): {exc.strerror}") from None
        authenticated = web is not None and web.auth_required
        warning = exposure_warning(what, text, address[0], authenticated)
        if warning:
            log.warning("%s", warning)
        return server

    def reload_web_configs(self) -> bool:
        """Read every web config file and its certificates again (for SIGHUP). False
        when one does not load: that one keeps its running version (logged)."""
        return all([web.reload() for web in self.web_configs])

    def not_ready(self) -> list[str]:
        """Why the engine is not ready (GET /ready); [] when it is."""
        return not_ready(self.engine)

    def _start_listeners(self) -> None:
        cfg = self.config.mi
        datagram = parse_listen(cfg.datagram)
        metrics_cfg = self.config.metrics
        self.http = self._http_listener(
            cfg.http, "HTTP MI", cfg.web_config, mi=True, metrics=not metrics_cfg.listen
        )
        self.metrics_http = self._http_listener(
            metrics_cfg.listen, "metrics listener", metrics_cfg.web_config, mi=False, metrics=True
        )
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
        listeners = (self.http, self.metrics_http, self.datagram, self.fifo)
        return [x for x in listeners if x is not None]

    def stop(self) -> None:
        for listener in reversed(self._listeners()):
            with contextlib.suppress(Exception):
                listener.stop()
        self.http = self.metrics_http = self.datagram = self.fifo = None
        stop_all(self.upstreams)  # unsubscribe while the ingest still reads
        self.upstreams = []
        for source in self.amqp:  # each acknowledges what it raised, then closes
            source.stop()
        self.amqp = []
        for stream in self.streams:  # each stores the offset it handled, then closes
            stream.stop()
        self.streams = []
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
        if self.metrics_http is not None:
            parts.append(f"metrics {self.metrics_http.url.removesuffix('/mi')}/metrics")
        elif self.http is not None:
            parts.append(f"metrics {self.http.url.removesuffix('/mi')}/metrics")
        if self.ingest is not None:
            parts.append(f"ingest {' '.join(self.ingest.names)}")
        if self.upstreams:
            parts.append(f"upstream {' '.join(u.mi for u in self.upstreams)}")
        for source in self.amqp:
            parts.append(source.name)
        for stream in self.streams:
            parts.append(stream.name)
        info = self.engine.describe()
        parts.append(f"{info['workers']} worker(s)")
        with self.engine.lock:
            parts.append(f"{len(self.engine.registry.events())} event(s)")
        parts.append(f"instance {info['instance']}")
        state = self.config.state_path()
        parts.append(f"state {state}" if state else "state off")
        return ", ".join(parts)
