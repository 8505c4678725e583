"""engine.address: subscriber socket syntax (SPEC section 2, MEASUREMENTS section 5).

Real resolution and real sockets; no mocks.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.address import (
    UNIX_PATH_MAX,
    AddressError,
    Destination,
    format_listen,
    parse_destination,
    parse_listen,
)


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback")

V4, V6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX

# (input, key, transport, host, port, path, family, sockaddr)
VALID = [
    ("udp:127.0.0.1:8081", "udp:127.0.0.1:8081", "udp", "127.0.0.1", 8081, "", V4,
     ("127.0.0.1", 8081)),
    ("udp:10.1.2.3:1", "udp:10.1.2.3:1", "udp", "10.1.2.3", 1, "", V4, ("10.1.2.3", 1)),
    ("udp:0.0.0.0:65535", "udp:0.0.0.0:65535", "udp", "0.0.0.0", 65535, "", V4,
     ("0.0.0.0", 65535)),
    ("udp:[::1]:8081", "udp:[::1]:8081", "udp", "::1", 8081, "", V6, ("::1", 8081, 0, 0)),
    ("udp:[2001:db8::1]:9", "udp:[2001:db8::1]:9", "udp", "2001:db8::1", 9, "", V6,
     ("2001:db8::1", 9, 0, 0)),
    # kept as written inside the brackets, not recompressed
    ("udp:[0:0:0:0:0:0:0:1]:9", "udp:[0:0:0:0:0:0:0:1]:9", "udp", "0:0:0:0:0:0:0:1", 9, "",
     V6, ("0:0:0:0:0:0:0:1", 9, 0, 0)),
    ("udp:[::ffff:1.2.3.4]:9", "udp:[::ffff:1.2.3.4]:9", "udp", "::ffff:1.2.3.4", 9, "", V6,
     ("::ffff:1.2.3.4", 9, 0, 0)),
    ("udp:localhost:9000", "udp:localhost:9000", "udp", "localhost", 9000, "", V4,
     ("127.0.0.1", 9000)),
    # leading zeros in the port are accepted and printed as a number
    ("udp:127.0.0.1:09000", "udp:127.0.0.1:9000", "udp", "127.0.0.1", 9000, "", V4,
     ("127.0.0.1", 9000)),
    ("unix:/tmp/opensips_event.sock", "unix:/tmp/opensips_event.sock", "unix", "", 0,
     "/tmp/opensips_event.sock", UNIX, "/tmp/opensips_event.sock"),
    ("/tmp/x.sock", "unix:/tmp/x.sock", "unix", "", 0, "/tmp/x.sock", UNIX, "/tmp/x.sock"),
    # the key as written; the address sent to is the real path (docs/security-guards.md)
    ("unix:/tmp//odd/../path/", "unix:/tmp//odd/../path/", "unix", "", 0,
     "/tmp//odd/../path/", UNIX, "/tmp/path"),
    ("/tmp/with:colon and space", "unix:/tmp/with:colon and space", "unix", "", 0,
     "/tmp/with:colon and space", UNIX, "/tmp/with:colon and space"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key", "transport", "host", "port", "path", "family", "sockaddr"), VALID
)
def test_valid_forms(
    text: str,
    key: str,
    transport: str,
    host: str,
    port: int,
    path: str,
    family: int,
    sockaddr: object,
) -> None:
    d = parse_destination(text)
    assert (d.key, str(d)) == (key, key)
    assert (d.transport, d.host, d.port, d.path) == (transport, host, port, path)
    assert (d.family, d.sockaddr) == (family, sockaddr)
    assert parse_destination(d.key) == d
    assert parse_destination(d.key).key == key


# Every socket row of MEASUREMENTS section 5: the input, what OpenSIPS did, what we do.
# Our outcome is either the key we print or ("error", part the message must name).
OPENSIPS_ROWS = [
    ("udp:127.0.0.1:9000", "OK", "udp:127.0.0.1:9000"),
    ("udp:127.0.0.1", "400 port not specified", ("error", "port")),
    ("udp:127.0.0.1:0", "400", ("error", "port")),
    ("udp:localhost:0", "400", ("error", "port")),
    ("udp:127.0.0.1:abc", "400", ("error", "port")),
    ("udp:127.0.0.1:9000x", "400", ("error", "port")),
    # deliberate difference: OpenSIPS wraps it to 4464
    ("udp:127.0.0.1:70000", "OK as udp:127.0.0.1:4464", ("error", "port")),
    ("udp::9000", "400", ("error", "host")),
    ("tcp:127.0.0.1:9000", "400 no protocol", ("error", "transport")),
    ("UDP:127.0.0.1:9000", "400 no protocol", ("error", "transport")),
    ("foo:bar", "404 on lookup", ("error", "transport")),
    # deliberate difference: unix: is optional, as the OpenSIPS manual says
    ("/tmp/ev_bare.sock", "400 no protocol", "unix:/tmp/ev_bare.sock"),
    ("unix:/tmp/ev_mi_test.sock", "OK", "unix:/tmp/ev_mi_test.sock"),
    ("unix:", "400 no socket specified", ("error", "path")),
    # deliberate difference: relative paths are rejected
    ("unix:rel.sock", "OK, relative to the cwd", ("error", "path")),
    # deliberate difference: IPv6 supported in brackets
    ("udp:[::1]:9000", "400", "udp:[::1]:9000"),
    ("udp:::1:9000", "400 port not specified", ("error", "brackets")),
    ("udp:localhost:9000", "OK, kept as written", "udp:localhost:9000"),
    ("", "-32602 bad type", ("error", "empty")),
]


@pytest.mark.parametrize(("text", "opensips", "ours"), OPENSIPS_ROWS)
def test_opensips_rows(text: str, opensips: str, ours: str | tuple[str, str]) -> None:
    if isinstance(ours, str):
        assert parse_destination(text).key == ours, opensips
        return
    with pytest.raises(AddressError) as info:
        parse_destination(text)
    assert ours[1] in str(info.value)


def test_ip6_localhost_follows_the_system_resolver() -> None:
    # OpenSIPS: "cannot resolve host ip6-localhost" where it is not in /etc/hosts.
    try:
        infos = socket.getaddrinfo("ip6-localhost", 9000, type=socket.SOCK_DGRAM)
    except OSError:
        infos = []
    if infos:
        d = parse_destination("udp:ip6-localhost:9000")
        assert d.key == "udp:ip6-localhost:9000"
        assert d.family in (V4, V6)
    else:
        with pytest.raises(AddressError, match=re.escape("cannot resolve host 'ip6-localhost'")):
            parse_destination("udp:ip6-localhost:9000")


BAD = [
    ("udp:127.0.0.1:", "port"),
    ("udp:127.0.0.1:+9", "port"),
    ("udp:127.0.0.1: 9", "port"),
    ("udp:127.0.0.1:-1", "port"),
    ("udp:127.0.0.1:0x10", "port"),
    ("udp:127.0.0.1:65536", "port"),
    ("udp:127.0.0.1:000", "port"),
    ("udp:127.0.0.1:\u0669", "port"),  # a non-ASCII digit
    ("udp:127.0.0.1:" + "9" * 5000, "port"),
    ("udp:[::1]", "port"),
    ("udp:[::1]:", "port"),
    ("udp:[::1]x:9", "port"),
    ("udp:", "port"),
    ("udp:[]:9", "host"),
    ("udp:[::1:9", "host"),
    ("udp:[127.0.0.1]:9", "host"),
    ("udp:[localhost]:9", "host"),
    ("udp:[::g]:9", "host"),
    ("udp:[fe80::1%eth0]:9", "host"),
    ("udp:::1", "host"),
    ("udp:256.1.1.1:9", "host"),
    ("udp:127.1:9", "host"),
    ("udp:010.0.0.1:9", "host"),
    ("udp:1.2.3.4.5:9", "host"),
    ("udp:-a:9", "host"),
    ("udp:a..b:9", "host"),
    ("udp:a b:9", "host"),
    ("udp:h\u00e9te:9", "host"),
    ("udp:" + "a" * 64 + ":9", "host"),
    ("udp:" + ".".join(["a" * 63] * 5) + ":9", "host"),
    ("Udp:127.0.0.1:9", "transport"),
    ("Unix:/tmp/x", "transport"),
    ("rel.sock", "transport"),
    (":9", "transport"),
    ("unix:unix:/tmp/x", "path"),
    ("unix:~/x", "path"),
    ("/tmp/a\x00b", "path"),
    ("/tmp/\ud800", "path"),
    (" udp:127.0.0.1:9", "whitespace"),
    ("udp:127.0.0.1:9\n", "whitespace"),
    ("/tmp/x ", "whitespace"),
    ("\t", "whitespace"),
]


@pytest.mark.parametrize(("text", "part"), BAD)
def test_errors_name_the_part(text: str, part: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_destination(text, resolve=False)
    message = str(info.value)
    assert part in message
    assert isinstance(info.value, ValueError)


def test_error_message_shape() -> None:
    with pytest.raises(AddressError) as info:
        parse_destination("udp:127.0.0.1:0")
    assert str(info.value) == "udp:127.0.0.1:0: port must be 1-65535, got '0'"


def test_localhost_really_resolves_and_keeps_its_name() -> None:
    d = parse_destination("udp:localhost:9000")
    assert d.sockaddr == ("127.0.0.1", 9000)
    assert d.family == V4
    assert d.key == "udp:localhost:9000"
    literal = parse_destination("udp:127.0.0.1:9000")
    assert d != literal  # two subscribers, as in OpenSIPS
    assert d.sockaddr == literal.sockaddr
    assert len({d, literal}) == 2


def test_unresolvable_host_is_named() -> None:
    with pytest.raises(AddressError, match=re.escape("cannot resolve host 'no-such-host.invalid'")):
        parse_destination("udp:no-such-host.invalid:9")


def test_resolve_false_skips_dns_and_keeps_identity() -> None:
    d = parse_destination("udp:no-such-host.invalid:9", resolve=False)
    assert (d.key, d.family) == ("udp:no-such-host.invalid:9", V4)
    assert d.sockaddr == ("no-such-host.invalid", 9)
    unresolved = parse_destination("udp:localhost:9000", resolve=False)
    resolved = parse_destination("udp:localhost:9000")
    assert unresolved.sockaddr == ("localhost", 9000)
    assert unresolved == resolved and hash(unresolved) == hash(resolved)


def test_unix_path_length_limit(tmp_path: Path) -> None:
    assert UNIX_PATH_MAX == 107
    ok = "/" + "a" * 106
    assert parse_destination(ok).path == ok
    assert parse_destination("unix:" + ok).key == "unix:" + ok
    with pytest.raises(AddressError, match="path") as info:
        parse_destination("/" + "a" * 107)
    assert "108 bytes" in str(info.value)
    # counted in UTF-8 bytes, not characters: 53 x 2 bytes + "/" = 107, one more is 109
    assert parse_destination("/" + "\u00e9" * 53).path == "/" + "\u00e9" * 53
    with pytest.raises(AddressError, match="path"):
        parse_destination("/" + "\u00e9" * 54)
    # and the limit is the kernel's: 107 bytes bind, 108 do not
    base = str(tmp_path)
    longest = base + "/" + "s" * (107 - len(base) - 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(parse_destination(longest).sockaddr)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        s.bind(longest + "s")


def test_exact_matching() -> None:
    a = parse_destination("udp:127.0.0.1:9")
    b = parse_destination("udp:127.0.0.10:9")
    assert a != b and a.key != b.key
    assert parse_destination("/tmp/a") != parse_destination("/tmp/ab")
    assert parse_destination("unix:/tmp/a") == parse_destination("/tmp/a")
    assert parse_destination("udp:[::1]:9") != parse_destination("udp:[0::1]:9")
    assert parse_destination("udp:127.0.0.1:9") != parse_destination("udp:127.0.0.1:90")


def test_destination_is_frozen() -> None:
    d = parse_destination("udp:127.0.0.1:9")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.port = 10  # type: ignore[misc]
    assert isinstance(d, Destination)


def _udp_roundtrip(family: int, bind_host: str, text_for_port: str) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as rx:
        rx.bind((bind_host, 0))
        rx.settimeout(5)
        port = rx.getsockname()[1]
        d = parse_destination(text_for_port.format(port=port))
        assert d.family == family
        with socket.socket(d.family, socket.SOCK_DGRAM) as tx:
            tx.connect(d.sockaddr)
            tx.send(b"ping")
        assert rx.recv(16) == b"ping"


def test_real_udp_v4() -> None:
    _udp_roundtrip(V4, "127.0.0.1", "udp:127.0.0.1:{port}")
    _udp_roundtrip(V4, "127.0.0.1", "udp:localhost:{port}")


@needs_ipv6
def test_real_udp_v6() -> None:
    _udp_roundtrip(V6, "::1", "udp:[::1]:{port}")


def test_real_unix_dgram(tmp_path: Path) -> None:
    path = str(tmp_path / "ev.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(5)
        for text in (path, "unix:" + path):
            d = parse_destination(text)
            assert (d.family, d.sockaddr, d.key) == (UNIX, path, "unix:" + path)
            with socket.socket(d.family, socket.SOCK_DGRAM) as tx:
                tx.connect(d.sockaddr)
                tx.send(text.encode())
            assert rx.recv(256) == text.encode()


# --- properties ------------------------------------------------------------

ports = st.integers(min_value=1, max_value=65535)
udp4 = st.builds(lambda a, p: f"udp:{a}:{p}", st.ip_addresses(v=4), ports)
udp6 = st.builds(lambda a, p: f"udp:[{a}]:{p}", st.ip_addresses(v=6), ports)
unix_paths = st.text(alphabet=string.ascii_letters + string.digits + "._-/", max_size=106).map(
    lambda t: "/" + t
)
unix_prefixed = unix_paths.map(lambda p: "unix:" + p)
label = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)
# a host made only of digits and dots must be an IPv4 literal, so names have a letter
names = (
    st.lists(label, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda n: not set(n) <= set(string.digits + "."))
)
udp_names = st.builds(lambda n, p: f"udp:{n}:{p}", names, ports)


@given(st.one_of(udp4, udp6, unix_prefixed))
def test_canonical_inputs_print_as_themselves(text: str) -> None:
    d = parse_destination(text)
    assert d.key == text
    assert parse_destination(d.key).key == d.key
    assert parse_destination(d.key) == d


@given(unix_paths)
def test_bare_paths_print_with_prefix(path: str) -> None:
    d = parse_destination(path)
    assert d.key == "unix:" + path
    assert parse_destination(d.key) == d


@given(udp_names)
def test_host_names_keep_their_spelling(text: str) -> None:
    d = parse_destination(text, resolve=False)
    assert d.key == text
    assert parse_destination(d.key, resolve=False) == d


prefixes = st.sampled_from(["udp:", "unix:", "/", "udp:[", "udp:[::1]:", "udp:127.0.0.1:", ""])
arbitrary = st.one_of(st.text(), st.builds(lambda a, b: a + b, prefixes, st.text()))


@given(arbitrary)
def test_arbitrary_text_parses_or_raises_address_error(text: str) -> None:
    try:
        d = parse_destination(text, resolve=False)
    except AddressError:
        return
    assert isinstance(d, Destination)
    assert parse_destination(d.key, resolve=False).key == d.key


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8888") == ("127.0.0.1", 8888)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("") is None and parse_listen("off") is None
    assert format_listen(("::1", 80)) == "[::1]:80"
    for bad in ("localhost:80", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ":80", "1.2.3.4:٣"):
        with pytest.raises(ValueError, match=r"expected|not an IP|port"):
            parse_listen(bad)
