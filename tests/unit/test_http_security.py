"""engine/mi/http.py (the browser checks, pure) and engine/mi/webconfig.py (the web
config file: keys, TLS context, basic auth and its cache), without sockets."""

from __future__ import annotations

import base64
import os
import ssl

import pytest

from engine.mi import http as checks
from engine.mi import webconfig
from engine.mi.webconfig import WebConfig, WebConfigError
from tests.helpers.tls import PASSWORD, USER, TLSFiles, web_config


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


LOOPBACK = checks.RequestPolicy.make(True)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:8888", True),
        ("127.0.0.2", True),
        ("[::1]:8888", True),
        ("localhost:8888", True),
        ("LOCALHOST", True),
        ("evil.example:8888", False),
        ("127.0.0.1.evil.example", False),
        ("10.0.0.1:8888", False),
        ("[::ffff:10.0.0.1]:80", False),
    ],
)
def test_host_on_a_loopback_listener(host: str, ok: bool) -> None:
    refusal = checks.check(LOOPBACK, "GET", "/metrics", {"Host": host})
    assert (refusal is None) is ok
    if not ok:
        assert refusal is not None and (refusal.status, refusal.reason) == (421, "host")


def test_allowed_hosts_and_listeners_beyond_loopback() -> None:
    policy = checks.RequestPolicy.make(True, hosts=["mi.internal"])
    assert checks.check(policy, "POST", "/mi", {"Host": "MI.internal:8888"}) is None
    assert checks.check(policy, "POST", "/mi", {"Host": "other.internal"}) is not None
    wide = checks.RequestPolicy.make(False)  # names are the operator's beyond loopback
    assert checks.check(wide, "POST", "/mi", {"Host": "anything.example"}) is None
    assert checks.check(LOOPBACK, "POST", "/mi", {}) is None  # HTTP/1.0 tools send no Host


def test_origin_is_refused_unless_allowed() -> None:
    for origin in ("https://evil.example", "null", "http://127.0.0.1:8888"):
        refusal = checks.check(LOOPBACK, "POST", "/mi", {"Origin": origin})
        assert refusal is not None and (refusal.status, refusal.reason) == (403, "origin")
    policy = checks.RequestPolicy.make(True, origins=["https://ops.example/"])
    assert checks.check(policy, "POST", "/mi", {"Origin": "https://ops.example"}) is None
    assert checks.check(policy, "GET", "/metrics", {"Origin": "https://x.example"}) is not None


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        (None, True),  # no browser sends this without Origin (checked above)
        ("text/plain", False),
        ("text/plain;charset=UTF-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
    ],
)
def test_content_type_of_post_mi(content_type: str | None, ok: bool) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    refusal = checks.check(LOOPBACK, "POST", "/mi", headers)
    assert (refusal is None) is ok
    if not ok:
        assert refusal is not None and (refusal.status, refusal.reason) == (415, "content_type")


def test_a_warning_for_every_listener_beyond_loopback_without_authentication() -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "mi.example"):
        warning = checks.exposure_warning("HTTP MI", f"{host}:8888", host, False)
        assert warning is not None and f"{host}:8888" in warning and "HTTP MI" in warning
        assert checks.exposure_warning("HTTP MI", f"{host}:8888", host, True) is None
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        assert checks.exposure_warning("metrics listener", f"{host}:1", host, False) is None


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.make(tmp_path_factory.mktemp("tls"))


def test_a_full_web_config_loads(tls: TLSFiles) -> None:
    path = web_config(tls.cert.parent / "full.yml", tls, client_auth="RequireAndVerifyClientCert")
    web = WebConfig(str(path))
    assert web.tls and web.auth_required
    assert web.context is not None and web.context.verify_mode == ssl.CERT_REQUIRED
    assert web.context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tls_server_confg:\n  cert_file: x\n", "`tls_server_confg`"),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  bogus: 1\n",
            "`tls_server_config.bogus`",
        ),
        ("rate_limit:\n  interval: 1s\n", "`rate_limit`"),
        ("tls_server_config:\n  cert_file: server.crt\n", "`tls_server_config.key_file`"),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            "  min_version: TLS14\n",
            "`tls_server_config.min_version`",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            "  client_auth_type: RequireAndVerifyClientCert\n",
            "`tls_server_config.client_ca_file`",
        ),
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
            "`tls_server_config.cert_file`",
        ),
        ("basic_auth_users:\n  alice: not-a-hash\n", "`basic_auth_users.alice`"),
        ("- a list\n", "`$`"),
    ],
)
def test_a_bad_web_config_names_the_key(tls: TLSFiles, text: str, key: str) -> None:
    path = tls.cert.parent / "bad.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError) as caught:
        WebConfig(str(path))
    assert key in str(caught.value) and str(path) in str(caught.value)


def test_credentials_are_verified_once_then_cached(tls: TLSFiles) -> None:
    web = WebConfig(str(web_config(tls.cert.parent / "auth.yml")))
    assert not web.tls
    good = basic(USER, PASSWORD)
    assert web.check(None) == webconfig.MISSING
    assert web.check("Bearer abc") == webconfig.MALFORMED
    assert web.check("Basic !!!") == webconfig.MALFORMED
    assert web.check(good) == webconfig.VERIFY  # not seen yet: bcrypt, off the loop
    assert web.verify(basic(USER, "wrong")) == webconfig.BAD
    assert web.verify(basic("mallory", PASSWORD)) == webconfig.BAD
    assert web.verify(basic(USER, "x" * 100)) == webconfig.BAD  # over bcrypt's 72 bytes
    assert web.check(basic(USER, "wrong")) == webconfig.VERIFY  # failures are not cached
    assert web.verify(good) == webconfig.OK
    assert web.check(good) == webconfig.OK  # cached: no bcrypt
    assert web.reload()
    assert web.check(good) == webconfig.VERIFY  # a reload forgets what was verified


def test_no_users_means_no_authentication(tls: TLSFiles) -> None:
    web = WebConfig(str(web_config(tls.cert.parent / "tls-only.yml", tls, users=False)))
    assert web.tls and not web.auth_required
    assert web.check(None) == webconfig.OK


def test_a_changed_file_is_reloaded_and_a_broken_one_kept_out(tls: TLSFiles) -> None:
    path = web_config(tls.cert.parent / "change.yml", users=False)
    web = WebConfig(str(path))
    assert not web.auth_required
    web_config(path)  # now with a user
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    web.maybe_reload(now=10**9)
    assert web.auth_required
    path.write_text("basic_auth_users: [oops\n")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    web.maybe_reload(now=2 * 10**9)
    assert web.auth_required  # the running version stays
    assert not web.reload()
