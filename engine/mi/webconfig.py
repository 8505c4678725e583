"""The web configuration file of the HTTP listeners: TLS and basic authentication,
in the format of Prometheus's exporter-toolkit (``--web.config.file``)::

    tls_server_config:
      cert_file: server.crt          # relative paths: from the file's directory
      key_file: server.key
      client_ca_file: ca.crt         # with a client_auth_type that asks for a certificate
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12             # TLS10 .. TLS13
      max_version: TLS13
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

A key we do not know or do not implement is an error naming it. The file and
the certificates are read again when one of them changes (checked at most once a
second, on the listener's loop) and by :meth:`WebConfig.reload` (SIGHUP); a
version that does not load is logged and the running one kept.

bcrypt is slow on purpose (tens of milliseconds at cost 10): a verified
``Authorization`` header is remembered (keyed by a salted SHA-256 of it, a
bounded table), so only a new or wrong credential costs a bcrypt check. An
unknown user is checked against a dummy hash of the same cost, so its answer
takes as long as a wrong password's (bcrypt's own comparison is constant-time;
the table is looked up by a salted hash the client cannot steer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import bcrypt
import yaml

from engine.errors import ConfigError

log = logging.getLogger("event_datagram.webconfig")

CACHE_SIZE: Final = 1024  # verified credentials remembered
CHECK_INTERVAL_S: Final = 1.0  # files are stat()ed at most this often

_TOP: Final = ("tls_server_config", "basic_auth_users")
_TLS_KEYS: Final = (
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "min_version",
    "max_version",
)
# The exporter-toolkit's keys we do not implement: named in the error, not ignored.
_UNSUPPORTED: Final = frozenset(
    {
        "http_server_config",
        "rate_limit",
        "tls_server_config.cert",
        "tls_server_config.key",
        "tls_server_config.client_ca",
        "tls_server_config.client_allowed_sans",
        "tls_server_config.cipher_suites",
        "tls_server_config.prefer_server_cipher_suites",
        "tls_server_config.curve_preferences",
    }
)
_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's client auth policies. Python's ssl verifies every certificate it receives, so
# the two "any certificate" policies verify too (stricter than Go: a CA is needed).
_CLIENT_AUTH: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# A bcrypt hash: version, cost, 22 characters of salt and 31 of hash.
_BCRYPT: Final = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# Checked when the user is unknown, so that costs what a wrong password costs: one
# per bcrypt cost, made on first use (on a worker thread, never at import or on the loop).
_dummies: dict[int, bytes] = {}
_dummies_lock = threading.Lock()


def _dummy_hash(cost: int) -> bytes:
    with _dummies_lock:
        hashed = _dummies.get(cost)
        if hashed is None:
            hashed = _dummies[cost] = bcrypt.hashpw(b"unknown user", bcrypt.gensalt(cost))
        return hashed


class WebConfigError(ConfigError):
    """The web config file cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    users: dict[str, bytes]  # user -> bcrypt hash
    context: ssl.SSLContext | None
    files: tuple[str, ...]  # the config file and the files it names
    signature: tuple[tuple[int, int] | None, ...]  # (mtime_ns, size) of each


def _signature(files: tuple[str, ...]) -> tuple[tuple[int, int] | None, ...]:
    out: list[tuple[int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


def _fail(path: str, key: str, why: str) -> WebConfigError:
    return WebConfigError(f"web config error in {path}: {why} - at `{key}`")


def _load(path: str) -> _Loaded:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise WebConfigError(f"web config error in {path}: cannot read it: {exc}") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WebConfigError(f"web config error in {path}: YAML syntax: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(path, "$", "expected a mapping")
    for key in data:
        _known(path, str(key), _TOP)
    base = os.path.dirname(os.path.abspath(path))
    files = [path]
    context = None
    tls = data.get("tls_server_config")
    if tls is not None:
        context = _tls_context(path, tls, base, files)
    users = _users(path, data.get("basic_auth_users"))
    names = tuple(files)
    return _Loaded(users, context, names, _signature(names))


def _known(path: str, key: str, allowed: tuple[str, ...], prefix: str = "") -> None:
    full = prefix + key
    if full in _UNSUPPORTED:
        raise _fail(path, full, "not supported by event-datagram")
    if key not in allowed:
        raise _fail(path, full, f"unknown key (expected one of: {', '.join(allowed)})")


def _string(path: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "expected a non-empty string")
    return value


def _tls_context(path: str, tls: Any, base: str, files: list[str]) -> ssl.SSLContext:
    where = "tls_server_config"
    if not isinstance(tls, dict):
        raise _fail(path, where, "expected a mapping")
    for key in tls:
        _known(path, str(key), _TLS_KEYS, where + ".")

    def file(key: str) -> str | None:
        value = tls.get(key)
        if value is None:
            return None
        name = os.path.join(base, _string(path, f"{where}.{key}", value))
        files.append(name)
        return name

    cert, key, ca = file("cert_file"), file("key_file"), file("client_ca_file")
    if cert is None or key is None:
        missing = "cert_file" if cert is None else "key_file"
        raise _fail(path, f"{where}.{missing}", "required with tls_server_config")
    policy = tls.get("client_auth_type", "NoClientCert")
    if policy not in _CLIENT_AUTH:
        raise _fail(
            path,
            f"{where}.client_auth_type",
            f"{policy!r}: expected one of {', '.join(_CLIENT_AUTH)}",
        )
    if policy == "NoClientCert" and ca is not None:
        why = "client_ca_file is set, and client_auth_type is NoClientCert"
        raise _fail(path, f"{where}.client_auth_type", why)
    if policy != "NoClientCert" and ca is None:
        raise _fail(path, f"{where}.client_ca_file", f"required with {policy}")
    versions = []
    for vkey, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = tls.get(vkey, default)
        if name not in _VERSIONS:
            raise _fail(
                path, f"{where}.{vkey}", f"{name!r}: expected one of {', '.join(_VERSIONS)}"
            )
        versions.append(_VERSIONS[name])
    if versions[0] > versions[1]:
        raise _fail(path, f"{where}.min_version", "above max_version")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version, context.maximum_version = versions
    except (ValueError, ssl.SSLError) as exc:
        raise _fail(path, f"{where}.min_version", str(exc)) from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(path, f"{where}.cert_file", f"cannot load {cert} with {key}: {exc}") from None
    context.verify_mode = _CLIENT_AUTH[policy]
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise _fail(path, f"{where}.client_ca_file", f"cannot load {ca}: {exc}") from None
    return context


def _users(path: str, users: Any) -> dict[str, bytes]:
    if users is None:
        return {}
    if not isinstance(users, dict):
        raise _fail(path, "basic_auth_users", "expected a mapping of user: bcrypt hash")
    out: dict[str, bytes] = {}
    for name, hashed in users.items():
        key = f"basic_auth_users.{name}"
        if not isinstance(name, str) or not name or ":" in name:
            raise _fail(path, key, "a user name is a non-empty string without ':'")
        text = _string(path, key, hashed)
        if not _BCRYPT.fullmatch(text):  # checked here, not at the first request
            raise _fail(path, key, "not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04-31)")
        out[name] = text.encode()
    return out


# Authentication verdicts.
OK: Final = "ok"
MISSING: Final = "missing"  # no Authorization header
MALFORMED: Final = "malformed"  # not "Basic base64(user:password)"
BAD: Final = "bad_credentials"  # unknown user or wrong password
VERIFY: Final = "verify"  # not known yet: a bcrypt check is needed (verify())


class WebConfig:
    """One web config file, loaded; reloaded when its files change (or on reload()).

    Raises WebConfigError at construction when the file does not load.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._state = _load(path)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._salt = secrets.token_bytes(16)
        self._verified: OrderedDict[bytes, str] = OrderedDict()

    @property
    def context(self) -> ssl.SSLContext | None:
        """The server TLS context, or None (plain HTTP)."""
        return self._state.context

    @property
    def tls(self) -> bool:
        return self._state.context is not None

    @property
    def auth_required(self) -> bool:
        return bool(self._state.users)

    def reload(self) -> bool:
        """Read the file (and certificates) again. False, logged, when it does not
        load: the running version is kept."""
        try:
            state = _load(self.path)
        except WebConfigError as exc:
            log.error("%s; keeping the running web config", exc)
            return False
        except Exception:  # never let a strange file stop a listener's loop
            log.exception("web config %s: cannot load it; keeping the running one", self.path)
            return False
        with self._lock:
            self._state = state
            self._verified.clear()  # users or hashes may have changed
        log.info("web config %s loaded", self.path)
        return True

    def maybe_reload(self, now: float | None = None) -> None:
        """Reload when a file changed; stat()s at most once per CHECK_INTERVAL_S."""
        now = time.monotonic() if now is None else now
        if now - self._checked < CHECK_INTERVAL_S:
            return
        self._checked = now
        state = self._state
        if _signature(state.files) != state.signature and not self.reload():
            # Do not retry a broken file every second: wait for its next change.
            self._state = _Loaded(state.users, state.context, state.files, _signature(state.files))

    def _key(self, header: str) -> bytes:
        return hashlib.sha256(self._salt + header.encode("latin-1", "replace")).digest()

    def check(self, header: str | None) -> str:
        """The verdict the loop can give without bcrypt: OK (no auth configured, or
        a credential verified before), MISSING, MALFORMED or VERIFY."""
        if not self._state.users:
            return OK
        if header is None:
            return MISSING
        if _credentials(header) is None:
            return MALFORMED
        key = self._key(header)
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return OK
        return VERIFY

    def verify(self, header: str) -> str:
        """OK or BAD, with a bcrypt check (slow: run it off the event loop)."""
        users = self._state.users
        if not users:
            return OK
        parsed = _credentials(header)
        if parsed is None:
            return MALFORMED
        user, password = parsed
        hashed = users.get(user)
        if hashed is None:  # as slow as a known user's check: no hint which names exist
            hashed_or_dummy = _dummy_hash(max(int(h[4:6]) for h in users.values()))
        else:
            hashed_or_dummy = hashed
        try:
            good = bcrypt.checkpw(password, hashed_or_dummy)
        except ValueError:  # a password over bcrypt's 72 bytes
            good = False
        if not good or hashed is None:
            return BAD
        key = self._key(header)
        with self._lock:
            self._verified[key] = user
            while len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        return OK


def _credentials(header: str) -> tuple[str, bytes] | None:
    """(user, password) of a Basic Authorization header, or None."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None
