"""What ``event-datagram run`` runs: the engine from a Config, and its MI listeners.

Start order: the engine (with the config's events, static subscriptions and
allow-list; the state file is loaded by ``Engine.start``), then the MI
listeners are bound (so a port in use fails the start before any upstream has
subscribed anywhere), then the sources (datagram ingest, then the upstreams,
which subscribe the ingest socket at their OpenSIPS MI in threads of their
own, never holding up the start, then the broker queues, each consumed in a
thread of its own), then the MI listeners serve. Stop order is the reverse:
the MI stops taking requests, the upstreams unsubscribe (about a second at
most, for MIs that do not answer), the broker sources acknowledge what they
raised and close, the ingest stops reading, then the engine drains its rings
and frees its shared memory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import urllib.parse
from typing import Protocol

from engine.address import AddressError, parse_listen
from engine.config import AmqpConfig, Config, IngestConfig, UpstreamConfig
from engine.errors import ConfigError, EngineError, RunError
from engine.guards import Endpoint, Guards, OwnSockets
from engine.mi.datagram import DatagramServer
from engine.mi.fifo import FifoServer
from engine.mi.health import not_ready
from engine.mi.http import RequestPolicy, SecurityCounters, exposure_warning, is_loopback_bind
from engine.mi.http_client import ClientAuth
from engine.mi.server import HTTPServer
from engine.mi.webconfig import WebConfig
from engine.paths import migrate_state, state_dir
from engine.producer import Engine
from engine.shm.segment import lock_holder
from engine.sources.amqp import AmqpSource
from engine.sources.ingest import Ingest, parse_ingest_socket
from engine.sources.stream import StreamSource
from engine.sources.upstream import Upstream, stop_all
from engine.subscriptions import StateFileError, SubscriptionError

log = logging.getLogger("event_datagram.run")

# What an upstream does: (mi, events, the socket it subscribes, expire).
UpstreamKey = tuple[str, tuple[str, ...], str, int, tuple[str, ...]]


class _Listener(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _configured_sockets(cfg: Config, own: OwnSockets) -> None:
    """Register the listeners the config names (port 0 ones once bound)."""
    for text in cfg.ingest.listen:
        with contextlib.suppress(ValueError):  # Config.validate checked them
            own.add("ingest socket", parse_ingest_socket(text)[1])
    listeners = (
        ("HTTP MI", cfg.mi.http),
        ("MI datagram", cfg.mi.datagram),
        ("metrics listener", cfg.metrics.listen),
    )
    for what, text in listeners:
        with contextlib.suppress(ValueError):
            address = parse_listen(text)
            if address is not None:
                own.add(what, address)
    if cfg.mi.fifo:
        own.add("MI FIFO", cfg.mi.fifo)


def _upstream_auth(up: UpstreamConfig) -> ClientAuth | None:
    """An [[upstream]]'s TLS and basic auth (the password file is read at each call)."""
    if not (up.ca_file or up.cert_file or up.user or up.password_file):
        return None  # an https:// MI without them: the system's CAs, no credentials
    return ClientAuth(
        ca_file=up.ca_file,
        cert_file=up.cert_file,
        key_file=up.key_file,
        user=up.user,
        password_file=up.password_file,
    )


def _mi_target_endpoint(target: str, own: OwnSockets) -> Endpoint | None:
    """The own listener an MI target (udp:, http(s)://, fifo:) reaches, or None."""
    if target.startswith("fifo:"):
        return own.match_path(target[5:]) if target[5:] else None
    if target.startswith("udp:"):
        host, port = target[4:].rsplit(":", 1)
        default = 0
    else:
        parts = urllib.parse.urlsplit(target)
        try:
            host, port = parts.hostname or "", str(parts.port or "")
        except ValueError:
            return None
        default = 443 if parts.scheme == "https" else 80
    host = host.strip("[]")
    number = int(port) if port.isdigit() else default
    try:  # every address the name has: the client may try any of them
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for info in infos:
        with contextlib.suppress(ValueError):
            ep = own.match_ip(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]), number)
            if ep is not None:
                return ep
    return None


def _warn_open(what: str, names: list[str], allow: list[str], key: str) -> None:
    """A UDP listener bound beyond loopback that answers (or takes from) everyone,
    or that names no networks: said once at start."""
    for name in names:
        if not name.startswith("udp:"):
            continue
        host = name[4:].rsplit(":", 1)[0].strip("[]")
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                continue
        if not allow:
            log.warning(
                "%s %s is bound beyond loopback and %s is empty: only loopback sources"
                " are served; name the networks that may send",
                what, name, key,
            )  # fmt: skip
        elif any(ipaddress.ip_network(a, strict=False).prefixlen == 0 for a in allow):
            log.warning(
                "%s %s is bound beyond loopback and %s lets every address send"
                " (a forged source makes it a reflector): narrow it",
                what, name, key,
            )  # fmt: skip


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
        self.upstream_keys: list[UpstreamKey] = []  # one per upstream, for reloads
        self.amqp: list[AmqpSource] = []
        self.amqp_configs: list[AmqpConfig] = []  # one per broker source, for reloads
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
            # Not while an engine of this instance runs (an older one, say): its file.
            if lock_holder(cfg.engine.resolved_runtime_dir(), cfg.engine.instance) is None:
                migrate_state(state, cfg.legacy_state_paths())
        # The listeners the config names, known before the state file is loaded and
        # the static subscriptions made, so that none of those can point at them.
        guards = Guards()
        _configured_sockets(cfg, guards.own)
        self._check_upstreams(guards.own)
        try:
            self.engine = Engine(
                cfg.engine,
                events=cfg.events,
                allow=cfg.allow_list(),
                state_file=state,
                unknown_events=cfg.state.unknown_events,
                guards=guards,
            )
        except (ValueError, SubscriptionError) as exc:
            raise ConfigError(f"config error in {self.source}: {exc}") from None
        for i, sub in enumerate(cfg.subscription):
            try:
                self.engine.register_event(sub.event)
                self.engine.subscribe(sub.event, sub.socket, None, sub.filter or None)
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
            # Bind the MI listeners before any source starts: a port in use then
            # fails the start before an upstream has subscribed anywhere (and so
            # before a stop would report unsubscribing from it).
            self._bind_listeners()
            self._start_sources()
            for listener in self._listeners():
                listener.start()
        except BaseException:
            self.stop()
            raise

    def _start_sources(self) -> None:
        # pika before any upstream subscribes: a start that fails subscribes nothing.
        if self.config.amqp:
            self.check_amqp_extra()
        self.start_ingest(self.config.ingest)
        for up in self.config.upstream:
            self.start_upstream(up)
        for cfg in self.config.amqp:
            self.start_amqp_source(cfg)
        self._start_streams()

    def _stream_offsets_dir(self) -> str:
        """Beside the state file (or in the state directory): the offset copies must
        survive a reboot, as the subscriptions do."""
        state = self.config.state_path()
        return os.path.dirname(os.path.abspath(state)) if state else state_dir()

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
                offsets_dir=self._stream_offsets_dir(),
            )
            self.streams.append(source)
            self.engine.add_source(source)
            source.start()

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
        for sock in self.ingest.sockets:  # as bound (port 0: its real port)
            bound = sock.path or sock.sock.getsockname()[:2]
            self.engine.own_socket("ingest socket", bound)
        _warn_open("ingest socket", self.ingest.names, cfg.allow, "ingest.allow")
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
        auth = (up.ca_file, up.cert_file, up.key_file, up.user, up.password_file)
        return (up.mi, tuple(up.events), up.socket or self.ingest.names[0], up.expire, auth)

    def start_upstream(self, up: UpstreamConfig) -> Upstream:
        """Each [[upstream]] subscribes its socket in a thread of its own."""
        key = self.upstream_key(up)
        own = _mi_target_endpoint(up.mi, self.engine.guards.own)
        if own is not None:  # one added by a reload (the start checked the config's)
            raise ConfigError(
                f"upstream MI {up.mi!r} is this engine's own {own.what} {own.name}:"
                " it would feed the engine its own events"
            )
        upstream = Upstream(
            self.engine,
            up.mi,
            up.events,
            key[2],
            up.expire,
            max_reply=up.max_reply_bytes,
            auth=_upstream_auth(up),
        )
        self.upstreams.append(upstream)
        self.upstream_keys.append(key)
        self.engine.add_source(upstream)
        upstream.start()
        return upstream

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

    def _bind_listeners(self) -> None:
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
                self.datagram = DatagramServer(self.engine, datagram, allow=cfg.datagram_allow)
            except OSError as exc:
                why = exc.strerror
                raise RunError(f"cannot listen on {cfg.datagram} (MI datagram): {why}") from None
        if cfg.fifo:
            try:
                self.fifo = FifoServer(self.engine, cfg.fifo, cfg.fifo_reply_dir)
            except OSError as exc:
                raise RunError(f"cannot create the MI FIFO {cfg.fifo}: {exc}") from None
        if self.http is not None:
            self.engine.own_socket("HTTP MI", self.http.address)
        if self.metrics_http is not None:
            self.engine.own_socket("metrics listener", self.metrics_http.address)
        if self.datagram is not None:
            self.engine.own_socket("MI datagram", self.datagram.address)
            _warn_open("MI datagram", [self.datagram.url], cfg.datagram_allow, "mi.datagram_allow")
        if self.fifo is not None:
            self.engine.own_socket("MI FIFO", self.fifo.path)

    def _check_upstreams(self, own: OwnSockets) -> None:
        """An [[upstream]] whose MI is this engine's own (in any spelling) would feed
        the engine its own events: a config error."""
        for i, up in enumerate(self.config.upstream):
            ep = _mi_target_endpoint(up.mi, own)
            if ep is not None:
                raise ConfigError(
                    f"config error in {self.source}: upstream MI {up.mi!r} is this engine's"
                    f" own {ep.what} {ep.name}: it would feed the engine its own events"
                    f" - at `$.upstream[{i}].mi`"
                )

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
        self.upstream_keys = []
        for source in self.amqp:  # each acknowledges what it raised, then closes
            source.stop()
        self.amqp = []
        self.amqp_configs = []
        for stream in self.streams:  # each stores the offset it handled, then closes
            stream.stop()
        self.streams = []
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        if self.engine is not None:
            self.engine.stop()

    def revive_sources(self) -> None:
        """Start again any source thread that died (each guard counts and logs it);
        the `run` command's main loop calls this a few times a second."""
        guards = [u.guard for u in self.upstreams]
        if self.ingest is not None:
            guards.append(self.ingest.guard)
        guards += [g for g in (getattr(s, "guard", None) for s in self.amqp) if g is not None]
        for guard in guards:
            guard.revive()

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
