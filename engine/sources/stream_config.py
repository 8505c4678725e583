"""One `[[stream]]` section: a RabbitMQ stream read over the stream protocol (SPEC section 14).

Kept apart from the source (stream.py) so the config loads without rstream.
"""

from __future__ import annotations

import re
import socket
import urllib.parse
from typing import Final, Literal, NamedTuple

import msgspec

from engine.sources.secret_url import SecretUrl, redact

DEFAULT_URL: Final = "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2F"
STREAM_PORT: Final = 5552  # the stream protocol's default port
AMQP_PORT: Final = 5672
OFFSETS: Final = ("first", "last", "next")
_MAX_AGE = re.compile(r"^[1-9][0-9]{0,8}[YMDhms]$")  # RabbitMQ's x-max-age: 7D, 12h, 30m...


class Endpoint(NamedTuple):
    """Where a URL points, its credentials apart (never in a name or a log line)."""

    host: str
    port: int
    username: str
    password: str
    vhost: str


class StreamConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One `[[stream]]` section (SPEC section 14; docs/streams.md)."""

    url: str = DEFAULT_URL
    """The stream listener: rabbitmq-stream:// (or amqp://) USER:PASS@HOST:PORT/VHOST;
    the port defaults to 5552 (the stream protocol's, not AMQP's)."""
    url_file: str = ""
    """Or: read the URL from this file (its first line), at start: no password in
    argv or config."""
    url_env: str = ""
    """Or: read the URL from this environment variable, at start."""
    stream: str = "opensips"
    """The stream (a queue of x-queue-type stream) this engine reads."""
    consumer: str = ""
    """This engine's name for its stored offset; "" = ENGINE.INSTANCE@HOSTNAME.
    Engines must not share one (each stores where it stopped)."""
    offset: str = "next"
    """Where to start when the broker holds no offset for `consumer`: next (what is
    published from now on), first, last (the last chunk), an offset (a number), or
    timestamp:MS (milliseconds since the epoch)."""
    max_age_ms: int = 0
    """Messages older than this (the time the broker stored them) are dropped,
    counted "stale"; 0 = no limit."""
    store_every_messages: int = 1000
    """Store the offset on the broker after this many messages ..."""
    store_every_ms: int = 1000
    """... or this long after the first message not yet stored, whichever comes first."""
    declare: bool = False
    """Declare the exchange (durable, exchange_type) and the stream (with the
    retention below), and bind them with binding_keys, over AMQP 0-9-1 at amqp_url.
    false = they must exist (the stream is counted "stream_missing" until it does)."""
    amqp_url: str = ""
    """AMQP 0-9-1 URL for declare; "" = url's host, credentials and vhost on port 5672."""
    amqp_url_file: str = ""
    """Or: read amqp_url from this file (its first line), at start."""
    amqp_url_env: str = ""
    """Or: read amqp_url from this environment variable, at start."""
    exchange: str = "opensips"
    """The exchange OpenSIPS publishes to ("" = do not bind: publishers write to the stream)."""
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    binding_keys: list[str] = msgspec.field(default_factory=lambda: ["#"])
    """Routing keys the stream takes (topic patterns for a topic exchange)."""
    retention_max_age: str = "1h"
    """x-max-age of a declared stream (7D, 12h, 30m, 20s...); "" = no age limit."""
    retention_max_bytes: int = 0
    """x-max-length-bytes of a declared stream; 0 = no size limit."""
    retention_segment_bytes: int = 0
    """x-stream-max-segment-size-bytes of a declared stream (retention drops whole
    segments); 0 = the broker's default (500 MB)."""
    unknown_events: Literal["reject", "register"] = "reject"
    """A notification of an event not registered: reject it (counted) or register it."""

    def problem(self) -> tuple[str, str] | None:
        """(key, why) for the first bad value, or None."""
        for urls, schemes, port in (
            (self._urls(), ("rabbitmq-stream", "amqp"), STREAM_PORT),
            (self._amqp_urls(), ("amqp",), AMQP_PORT),
        ):
            conflict = urls.conflict()
            if conflict:
                return conflict
            try:
                url = urls.value()
                if url or not urls.prefix:  # amqp_url "" = url's, on port 5672
                    endpoint(url, schemes, port)
            except ValueError as exc:
                return urls.key, str(exc)
        if not self.stream or len(self.stream.encode()) > 255:
            return "stream", "expected a stream name of 1 to 255 bytes"
        if len(self.consumer.encode()) > 255:
            return "consumer", "over 255 bytes"
        try:
            offset_spec(self.offset)
        except ValueError as exc:
            return "offset", str(exc)
        if not 0 <= self.max_age_ms <= 2**31 - 1:
            return "max_age_ms", f"{self.max_age_ms}: expected 0 to 2147483647"
        if not 1 <= self.store_every_messages <= 1_000_000:
            return "store_every_messages", f"{self.store_every_messages}: expected 1 to 1000000"
        if not 10 <= self.store_every_ms <= 3_600_000:
            return "store_every_ms", f"{self.store_every_ms}: expected 10 to 3600000"
        if self.exchange and not self.binding_keys:
            return "binding_keys", 'no routing keys (["#"] = all of them on a topic exchange)'
        for key in self.binding_keys:
            if len(key.encode()) > 255:
                return "binding_keys", f"{key[:20]!r}...: over 255 bytes"
        if self.retention_max_age and not _MAX_AGE.match(self.retention_max_age):
            return "retention_max_age", f"{self.retention_max_age!r}: expected e.g. 7D, 12h, 30m"
        if self.retention_max_bytes < 0 or self.retention_segment_bytes < 0:
            return "retention_max_bytes", "expected 0 or more bytes"
        return None

    def _urls(self) -> SecretUrl:
        return SecretUrl("", self.url, self.url_file, self.url_env, DEFAULT_URL)

    def _amqp_urls(self) -> SecretUrl:
        return SecretUrl("amqp_", self.amqp_url, self.amqp_url_file, self.amqp_url_env)

    def url_value(self) -> str:
        """The stream URL, from `url_file`, `url_env` or `url`. Raises ValueError
        saying why (never with the URL's text: it holds the password)."""
        return self._urls().value()

    def resolved(self) -> StreamConfig:
        """This section with url and amqp_url read from their file or variable (what
        a source uses: the file is read once, at start). Raises ValueError as url_value."""
        return msgspec.structs.replace(
            self,
            url=self.url_value(),
            url_file="",
            url_env="",
            amqp_url=self._amqp_urls().value(),
            amqp_url_file="",
            amqp_url_env="",
        )

    def display_name(self) -> str:
        """The source's name in metrics and logs: the URL without credentials, the
        stream (and the consumer name, when set)."""
        where = endpoint(self.url_value(), ("rabbitmq-stream", "amqp"), STREAM_PORT)
        vhost = urllib.parse.quote(where.vhost, safe="")
        return f"rabbitmq-stream://{where.host}:{where.port}/{vhost} {self.stream}"

    def consumer_name(self, instance: str) -> str:
        """The name this engine stores its offset under."""
        return self.consumer or f"{instance}@{socket.gethostname()}"[:255]

    def declare_endpoint(self) -> Endpoint:
        amqp_url = self._amqp_urls().value()
        if amqp_url:
            return endpoint(amqp_url, ("amqp",), AMQP_PORT)
        return endpoint(self.url_value(), ("rabbitmq-stream", "amqp"), STREAM_PORT)._replace(
            port=AMQP_PORT
        )

    def declare_arguments(self) -> dict[str, object]:
        """The stream's x-arguments when the engine declares it."""
        arguments: dict[str, object] = {"x-queue-type": "stream"}
        if self.retention_max_age:
            arguments["x-max-age"] = self.retention_max_age
        if self.retention_max_bytes:
            arguments["x-max-length-bytes"] = self.retention_max_bytes
        if self.retention_segment_bytes:
            arguments["x-stream-max-segment-size-bytes"] = self.retention_segment_bytes
        return arguments


def endpoint(url: str, schemes: tuple[str, ...], default_port: int) -> Endpoint:
    """Parse SCHEME://USER:PASS@HOST:PORT/VHOST (vhost "/" is %2F; "" means "/").

    Raises:
        ValueError: naming the URL without its credentials.
    """
    parts = urllib.parse.urlsplit(url)
    shown = redact(url)
    if parts.scheme not in schemes:
        expected = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{shown!r}: expected {expected}USER:PASS@HOST:PORT/VHOST")
    if not parts.hostname:
        raise ValueError(f"{shown!r}: no host")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"{shown!r}: bad port") from None
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return Endpoint(
        parts.hostname,
        port,
        urllib.parse.unquote(parts.username or "guest"),
        urllib.parse.unquote(parts.password or "guest"),
        vhost,
    )


def offset_spec(text: str) -> tuple[str, int | None]:
    """("first" | "last" | "next", None), ("offset", N) or ("timestamp", MS).

    Raises:
        ValueError: the text is none of them.
    """
    if text in OFFSETS:
        return text, None
    kind, _, number = text.rpartition(":")
    if kind in ("", "timestamp") and number.isdigit() and len(number) < 20:
        return ("timestamp" if kind else "offset"), int(number)
    raise ValueError(f"{text!r}: expected next, first, last, an offset or timestamp:MS")
