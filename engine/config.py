"""The configuration file: TOML decoded into msgspec structs.

Every key has a default (the values in engine/default.toml, which is what
``event-datagram run`` uses without ``--config``). An unknown key, a wrong
type or a bad value fails at start with the key's path, e.g.::

    config error in my.toml: Expected `int`, got `str` - at `$.engine.workers`

Command-line flags of ``run`` override the file (see engine/cli.py).
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from importlib import resources
from typing import Any, Literal

import msgspec

from engine import paths
from engine.address import parse_destination, parse_listen
from engine.errors import BadEventName, ConfigError
from engine.mi.datagram_guard import parse_datagram_allow
from engine.options import EngineOptions
from engine.shm.segment import check_instance_name
from engine.sources.amqp import AmqpConfig
from engine.sources.ingest import parse_allow, parse_ingest_socket
from engine.sources.stream_config import StreamConfig
from engine.subscriptions import AllowList
from engine.targets import parse_filter, parse_target
from engine.wire import check_event_name

__all__ = [
    "DEFAULT_EVENTS",
    "AmqpConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "MIConfig",
    "MetricsConfig",
    "StateConfig",
    "StaticSubscription",
    "StreamConfig",
    "UpstreamConfig",
    "default_text",
    "load",
    "loads",
]

DEFAULT_EVENTS = [
    "E_PIKE_BLOCKED",
    "E_CORE_THRESHOLD",
    "E_CORE_SHM_THRESHOLD",
    "E_CORE_PKG_THRESHOLD",
    "E_SAMPLE",
]


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class MIConfig(_Section):
    http: str = "127.0.0.1:8558"
    """HTTP listener for POST /mi and GET /metrics; "" disables it."""
    datagram: str = "127.0.0.1:8559"
    """UDP listener for MI datagrams; "" disables it."""
    datagram_allow: list[str] = msgspec.field(default_factory=list)
    """Source networks the MI datagram socket answers; [] = loopback only."""
    fifo: str = ""
    """Path of the MI FIFO to create; "" = no FIFO."""
    fifo_reply_dir: str = "/tmp"
    """Directory where clients' reply FIFOs are."""
    web_config: str = ""
    """Web config file (exporter-toolkit YAML: TLS, basic auth) of the HTTP listener;
    "" = plain HTTP without authentication."""
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    """Origin header values the HTTP listeners accept (e.g. "https://ops.example");
    a request with any other Origin is refused (403)."""
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    """Host names a loopback HTTP listener accepts beyond loopback addresses and
    localhost (421 otherwise)."""


class StateConfig(_Section):
    enabled: bool = True
    """Persist subscriptions made over the MI, so they survive a restart."""
    file: str = ""
    """The state file; "" = <state directory>/<instance>.state.json (docs/operations.md)."""
    unknown_events: Literal["error", "register", "drop"] = "error"
    """Saved subscriptions to events the config does not name: refuse to start
    ("error", naming them), "register" the events, or "drop" the subscriptions."""


class StaticSubscription(_Section):
    event: str
    socket: str
    """A subscriber socket, or a group: "virtual:POLICY sock1 sock2" (docs/routing.md)."""
    filter: list[str] = msgspec.field(default_factory=list)
    """name=pattern conditions on the event's params (shell wildcards), ANDed."""


class IngestConfig(_Section):
    listen: list[str] = msgspec.field(default_factory=list)
    """Datagram sockets that take JSON-RPC notifications (udp:HOST:PORT, unix:/PATH)."""
    allow: list[str] = msgspec.field(default_factory=list)
    """UDP source networks that may send; [] = loopback only."""
    unknown_events: Literal["reject", "register"] = "reject"
    """A notification of an event not registered: reject it (counted) or register it."""


class UpstreamConfig(_Section):
    mi: str
    """An OpenSIPS MI, as the CLI's --mi takes it: udp:HOST:PORT, http://HOST:PORT/mi
    or fifo:PATH."""
    events: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Events to take from it; ["*"] = every event its events_list shows."""
    socket: str = ""
    """What the upstream sends to; "" = the first ingest.listen socket, as bound."""
    expire: int = 120
    """Seconds the subscription lasts at the upstream; refreshed every expire/3."""
    max_reply_bytes: int = 4 << 20
    """Bytes of one MI reply at most; a larger one is refused unread (too_large)."""
    ca_file: str = ""
    """https:// MI: PEM CA certificates to trust; "" = the system's."""
    cert_file: str = ""
    """https:// MI: a PEM client certificate (mutual TLS); "" = none."""
    key_file: str = ""
    """https:// MI: the client certificate's key, when not in cert_file."""
    user: str = ""
    """http(s):// MI: basic-auth user (or the URL's user@); needs password_file."""
    password_file: str = ""
    """http(s):// MI: the file whose first line is the basic-auth password (read at
    each call, so a rotated one is taken); never a password in the config."""


UPSTREAM_MIN_EXPIRE = 6  # refreshed every expire/3: not more often than the 2 s checks
UPSTREAM_REPLY_BYTES = (4096, 1 << 30)  # max_reply_bytes: an events_list fits; memory bounded


class MetricsConfig(_Section):
    per_subscriber: bool = False
    """Add per-subscriber series (datagrams sent, failures, TTL) to /metrics."""
    listen: str = ""
    """HOST:PORT of a listener of its own for /metrics, /health and /ready;
    "" = /metrics on the MI's HTTP listener."""
    web_config: str = ""
    """Web config file of the metrics listener; "" = plain HTTP without authentication."""


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written to stderr (--log-level overrides it)."""
    format: Literal["text", "json"] = "text"
    """"text" lines or one "json" object per line (--log-format overrides it)."""


class Config(_Section):
    events: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_EVENTS))
    allow: list[str] = msgspec.field(default_factory=list)
    engine: EngineOptions = msgspec.field(default_factory=EngineOptions)
    mi: MIConfig = msgspec.field(default_factory=MIConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    subscription: list[StaticSubscription] = msgspec.field(default_factory=list)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    upstream: list[UpstreamConfig] = msgspec.field(default_factory=list)
    amqp: list[AmqpConfig] = msgspec.field(default_factory=list)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    stream: list[StreamConfig] = msgspec.field(default_factory=list)

    def state_path(self) -> str | None:
        """Where subscriptions are persisted, or None when persistence is off."""
        if not self.state.enabled:
            return None
        if self.state.file:
            return self.state.file
        return os.path.join(paths.state_dir(), f"{self.engine.instance}.state.json")

    def legacy_state_paths(self) -> list[str]:
        """Where an older version kept the default state file (the runtime directory)."""
        if not self.state.enabled or self.state.file:
            return []
        dirs = [self.engine.resolved_runtime_dir(), *paths.legacy_runtime_dirs()]
        name = f"{self.engine.instance}.state.json"
        return [os.path.join(d, name) for d in dict.fromkeys(dirs)]

    def allow_list(self) -> AllowList:
        if not self.allow:
            return AllowList.default(self.engine.resolved_runtime_dir())
        return AllowList.parse(self.allow)

    def validate(self) -> None:
        """Check what msgspec's types cannot; raise ConfigError naming the key."""
        try:
            check_instance_name(self.engine.instance)
        except ValueError as exc:
            raise ConfigError(f"{exc} - at `$.engine.instance`") from None
        for i, name in enumerate(self.events):
            _check_event(name, f"$.events[{i}]")
        for key, value in (
            ("mi.http", self.mi.http),
            ("mi.datagram", self.mi.datagram),
            ("metrics.listen", self.metrics.listen),
        ):
            try:
                parse_listen(value, "listen address")
            except ValueError as exc:
                raise ConfigError(f"{exc} - at `$.{key}`") from None
        try:
            self.allow_list()
        except ValueError as exc:
            raise ConfigError(f"{exc} - at `$.allow`") from None
        try:
            parse_datagram_allow(self.mi.datagram_allow)
        except ValueError as exc:
            raise ConfigError(f"{exc} - at `$.mi.datagram_allow`") from None
        for i, text in enumerate(self.ingest.listen):
            try:
                parse_ingest_socket(text)
            except ValueError as exc:
                raise ConfigError(f"{exc} - at `$.ingest.listen[{i}]`") from None
        try:
            parse_allow(self.ingest.allow)
        except ValueError as exc:
            raise ConfigError(f"{exc} - at `$.ingest.allow`") from None
        for i, sub in enumerate(self.subscription):
            _check_event(sub.event, f"$.subscription[{i}].event")
            try:
                parse_target(sub.socket, resolve=False)
            except ValueError as exc:
                raise ConfigError(f"{exc} - at `$.subscription[{i}].socket`") from None
            try:
                parse_filter(sub.filter)
            except ValueError as exc:
                raise ConfigError(f"{exc} - at `$.subscription[{i}].filter`") from None
        self._validate_upstreams()
        self._validate_amqp()
        self._validate_streams()

    def _validate_streams(self) -> None:
        seen: set[str] = set()
        for i, source in enumerate(self.stream):
            where = f"$.stream[{i}]"
            problem = source.problem()
            if problem:
                raise ConfigError(f"{problem[1]} - at `{where}.{problem[0]}`")
            name = f"{source.display_name()} {source.consumer_name(self.engine.instance)}"
            if name in seen:  # one consumer name twice: both would store one offset
                raise ConfigError(f"the same stream and consumer twice - at `{where}`")
            seen.add(name)

    def _validate_amqp(self) -> None:
        seen: set[str] = set()
        for i, source in enumerate(self.amqp):
            where = f"$.amqp[{i}]"
            problem = source.problem()
            if problem:
                raise ConfigError(f"{problem[1]} - at `{where}.{problem[0]}`")
            for j, key in enumerate(source.binding_keys):
                if len(key.encode()) > 255:
                    raise ConfigError(f"over 255 bytes - at `{where}.binding_keys[{j}]`")
            name = f"{source.display_name()} {sorted(source.binding_keys)}"
            if name in seen:
                raise ConfigError(f"the same queue and keys twice - at `{where}`")
            seen.add(name)

    def _validate_upstreams(self) -> None:
        seen: set[str] = set()
        for i, up in enumerate(self.upstream):
            where = f"$.upstream[{i}]"
            if not self.ingest.listen:
                raise ConfigError(
                    "an upstream sends to an ingest socket, and ingest.listen is empty"
                    f" - at `{where}`"
                )
            _check_upstream_auth(up, where)  # first: a URL with a password is never shown
            why = _mi_target_problem(up.mi)
            if why:
                raise ConfigError(f"upstream MI {up.mi!r}: {why} - at `{where}.mi`")
            if up.mi in seen:
                raise ConfigError(f"upstream MI {up.mi!r} is named twice - at `{where}.mi`")
            seen.add(up.mi)
            if not up.events:
                raise ConfigError(f'no events (["*"] = all of them) - at `{where}.events`')
            if "*" in up.events and len(up.events) > 1:
                raise ConfigError(f'"*" takes every event: name none with it - at `{where}.events`')
            for j, name in enumerate(up.events):
                if name != "*":
                    _check_event(name, f"{where}.events[{j}]")
            if up.socket:
                try:
                    parse_destination(up.socket, resolve=False)
                except ValueError as exc:
                    raise ConfigError(f"{exc} - at `{where}.socket`") from None
            elif _is_wildcard(self.ingest.listen[0]):
                raise ConfigError(
                    f"the first ingest socket {self.ingest.listen[0]!r} is a wildcard address,"
                    " which an upstream cannot send to: name the address it sends to"
                    f" - at `{where}.socket`"
                )
            if up.expire < UPSTREAM_MIN_EXPIRE or up.expire > 2**31 - 1:
                raise ConfigError(
                    f"expire {up.expire}: expected {UPSTREAM_MIN_EXPIRE} to 2147483647 seconds"
                    f" - at `{where}.expire`"
                )
            low, high = UPSTREAM_REPLY_BYTES
            if not low <= up.max_reply_bytes <= high:
                raise ConfigError(
                    f"max_reply_bytes {up.max_reply_bytes}: expected {low} to {high}"
                    f" - at `{where}.max_reply_bytes`"
                )


def _mi_target_problem(text: str) -> str | None:
    """Why `text` is not an MI target the client can call, or None."""
    if text.startswith(("http://", "https://")):
        return None if len(text.split("://", 1)[1]) else "no host"
    if text.startswith("fifo:"):
        return None if text[5:] else "no path"
    if text.startswith("udp:"):
        try:
            address = parse_listen(text[4:], "MI datagram address")
        except ValueError as exc:
            return str(exc)
        if address is None or address[1] == 0:
            return "expected udp:IP:PORT with a port"
        return None
    return "expected udp:IP:PORT, http://HOST:PORT/mi or fifo:PATH"


def _check_upstream_auth(up: UpstreamConfig, where: str) -> None:
    """TLS files for https:// only, credentials for HTTP only, the password from a
    readable file (a password in the URL would be shown in every log line)."""
    http = up.mi.startswith(("http://", "https://"))
    parts = urllib.parse.urlsplit(up.mi) if http else None
    if parts is not None and ":" in parts.netloc.rpartition("@")[0]:
        raise ConfigError(
            "a password in the MI URL is refused (it would be in logs): give it in"
            f" password_file - at `{where}.mi`"
        )
    tls_keys = {"ca_file": up.ca_file, "cert_file": up.cert_file, "key_file": up.key_file}
    for key, value in tls_keys.items():
        if value and not up.mi.startswith("https://"):
            raise ConfigError(f"{key} is for an https:// MI - at `{where}.{key}`")
        if value and not os.access(value, os.R_OK):
            raise ConfigError(f"{key} {value!r} cannot be read - at `{where}.{key}`")
    if up.key_file and not up.cert_file:
        raise ConfigError(f"key_file needs cert_file - at `{where}.key_file`")
    user = up.user or (urllib.parse.unquote(parts.username or "") if parts else "")
    for key, value in (("user", up.user), ("password_file", up.password_file)):
        if value and not http:
            raise ConfigError(f"{key} is for an http:// or https:// MI - at `{where}.{key}`")
    if ":" in user:
        raise ConfigError(f"user {user!r}: a basic-auth user name has no ':' - at `{where}.user`")
    if user and not up.password_file:
        raise ConfigError(f"user {user!r} needs password_file - at `{where}.password_file`")
    if up.password_file and not user:
        raise ConfigError(f"password_file needs a user - at `{where}.user`")
    if up.password_file:
        try:
            with open(up.password_file, "rb") as f:
                empty = not f.read(4096).split(b"\n", 1)[0].rstrip(b"\r")
        except OSError as exc:
            raise ConfigError(
                f"password_file {up.password_file!r}: {exc.strerror} - at `{where}.password_file`"
            ) from None
        if empty:
            raise ConfigError(
                f"password_file {up.password_file!r} is empty (its first line is the password)"
                f" - at `{where}.password_file`"
            )


def _is_wildcard(ingest_socket: str) -> bool:
    _family, address = parse_ingest_socket(ingest_socket)
    return isinstance(address, tuple) and address[0] in ("0.0.0.0", "::")


def _check_event(name: str, where: str) -> None:
    try:
        check_event_name(name)
    except BadEventName as exc:
        raise ConfigError(f"{exc} - at `{where}`") from None


def loads(text: str, source: str = "<string>") -> Config:
    """Parse and check a TOML config; raise ConfigError("config error in SOURCE: ...")."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
        config = msgspec.convert(data, Config)
        config.validate()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error in {source}: TOML syntax: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config error in {source}: {_engine_path(str(exc))}") from None
    except ConfigError as exc:
        raise ConfigError(f"config error in {source}: {exc}") from None
    return config


def _engine_path(message: str) -> str:
    """EngineOptions checks its own values, so its paths lack the `engine.` prefix."""
    m = re.search(r" - at `\$\.(\w+)", message)
    if m and m.group(1) not in Config.__struct_fields__:
        return message[: m.start(1)] + "engine." + message[m.start(1) :]
    return message


def load(path: str | None) -> Config:
    """Load ``path``, or the shipped default config when None."""
    if path is None:
        return loads(default_text(), "the default config")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config error in {path}: cannot read it: {exc}") from None
    return loads(text, path)


def default_text() -> str:
    """The text of engine/default.toml (package data)."""
    return resources.files("engine").joinpath("default.toml").read_text(encoding="utf-8")
