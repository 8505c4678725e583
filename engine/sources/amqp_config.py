"""`[[amqp]]`: one broker source's settings (engine/sources/amqp.py reads them).

The URL is read once (from `url`, `url_file` or `url_env`) and never logged with
its password (`secret_url.redact`); a URL pika would refuse is a config error.
"""

from __future__ import annotations

import urllib.parse
from typing import Final, Literal

import msgspec

from engine.sources.amqp_frames import DEFAULT_MAX_BYTES
from engine.sources.secret_url import SecretUrl, redact

MIN_MESSAGE_BYTES: Final = 1024  # the least max_message_bytes

EXCHANGE_TYPES = Literal["topic", "direct", "fanout", "headers"]


DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class AmqpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One `[[amqp]]` section (SPEC section 9)."""

    url: str = DEFAULT_URL
    """The broker: amqp://USER:PASS@HOST:PORT/VHOST (vhost "/" is %2F)."""
    url_file: str = ""
    """Or: read the URL from this file (its first line): no password in argv or config."""
    url_env: str = ""
    """Or: read the URL from this environment variable."""
    exchange: str = "opensips"
    """The exchange OpenSIPS publishes to; must exist unless declare = true."""
    exchange_type: EXCHANGE_TYPES = "topic"
    declare: bool = False
    """Declare the exchange (durable, of exchange_type) if it does not exist."""
    binding_keys: list[str] = msgspec.field(default_factory=lambda: ["#"])
    """Routing keys this engine takes (topic patterns for a topic exchange)."""
    queue: str = ""
    """"" = a server-named, exclusive queue for this engine; else a durable one."""
    prefetch: int = 1000
    """Messages the broker may send ahead of our acknowledgements."""
    max_age_ms: int = 0
    """Older messages are dropped, counted "stale"; 0 = no limit."""
    unknown_events: Literal["reject", "register"] = "reject"
    """A notification of an event not registered: reject it (counted) or register it."""
    max_message_bytes: int = DEFAULT_MAX_BYTES
    """A larger message is skipped as it arrives (never buffered), counted oversize."""

    def _urls(self) -> SecretUrl:
        return SecretUrl("", self.url, self.url_file, self.url_env, DEFAULT_URL)

    def _url_key(self) -> str:
        return self._urls().key

    def url_value(self) -> str:
        """The broker URL, from `url_file`, `url_env` or `url`. Raises ValueError
        saying why (never with the URL's text: it holds the password)."""
        return self._urls().value()

    def problem(self) -> tuple[str, str] | None:
        """(key, why) for the first bad value, or None."""
        conflict = self._urls().conflict()
        if conflict:
            return conflict
        try:
            url = self.url_value()
            _parse_url(url)
        except ValueError as exc:
            return self._url_key(), str(exc)
        why = _pika_url_problem(url)
        if why:
            return self._url_key(), why
        if not self.exchange:
            return "exchange", "expected an exchange name (the default exchange cannot be bound)"
        if not self.binding_keys:
            return "binding_keys", 'no routing keys (["#"] = all of them on a topic exchange)'
        if not 1 <= self.prefetch <= 65535:
            return "prefetch", f"{self.prefetch}: expected 1 to 65535"
        if not 0 <= self.max_age_ms <= 2**31 - 1:
            return "max_age_ms", f"{self.max_age_ms}: expected 0 to 2147483647"
        if not MIN_MESSAGE_BYTES <= self.max_message_bytes <= 2**31 - 1:
            return "max_message_bytes", (
                f"{self.max_message_bytes}: expected {MIN_MESSAGE_BYTES} to 2147483647"
            )
        return None

    def display_name(self) -> str:
        """The source's name in metrics and logs: the URL without credentials, the
        exchange, and the queue when named."""
        parts = _parse_url(self.url_value())
        name = f"amqp://{parts.hostname}:{parts.port or 5672}{parts.path or '/'} {self.exchange}"
        return f"{name} queue={self.queue}" if self.queue else name


def _parse_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"{redact(url)!r}: expected amqp://USER:PASS@HOST:PORT/VHOST")
    if not parts.hostname:
        raise ValueError(f"{redact(url)!r}: no host")
    try:
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise ValueError(f"{redact(url)!r}: bad port") from None
    return parts


def _pika_url_problem(url: str) -> str:
    """What pika says of the URL (its query parameters: heartbeat=abc, an unknown
    one...) before a thread tries it, the password never in it; "" when it takes
    it, or when pika is not installed (run says so)."""
    try:
        import pika
    except ImportError:
        return ""
    try:
        pika.URLParameters(url)
    except Exception as exc:  # pika raises ValueError, and others for odd values
        why = str(exc) or type(exc).__name__
        password = urllib.parse.urlsplit(url).password
        for secret in {password, urllib.parse.unquote(password or "")} - {None, ""}:
            why = why.replace(str(secret), "***")
        return f"{redact(url)!r}: {why}"
    return ""
