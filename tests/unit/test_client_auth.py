"""The client side of an authenticated MI, without a server: the CLI's options
resolved into a ClientAuth (flags, URL user, environment, password file), the
[[upstream]] auth keys and their errors, and that no password is ever shown
(the servers themselves: tests/integration/test_http_client_tls.py and
tests/system/test_cli_auth.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine import config
from engine.cli.main import _auth_or_usage, build_parser, client_auth
from engine.errors import MIClientError
from engine.mi.http_client import ClientAuth, http_post, read_password_file, shown

SECRET = "pa55-w0rd-never-shown"
HTTPS = "https://127.0.0.1:1/mi"


def _args(*argv: str) -> argparse.Namespace:
    return build_parser(["events"]).parse_args(["events", *argv])


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "pw"
    path.write_text(SECRET + "\nsecond line ignored\n")
    return path


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EVENT_DATAGRAM_MI_USER", "EVENT_DATAGRAM_MI_PASSWORD", "EVENT_DATAGRAM_MI"):
        monkeypatch.delenv(name, raising=False)


def test_flags_and_password_file(password_file: Path) -> None:
    auth = client_auth(
        _args("--mi", HTTPS, "--ca-file", "/ca.pem", "--user", "ops",
              "--password-file", str(password_file))
    )  # fmt: skip
    assert auth == ClientAuth(ca_file="/ca.pem", user="ops", password=SECRET)
    assert SECRET not in repr(auth)  # a ClientAuth in a log line shows no password


def test_the_url_user_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_DATAGRAM_MI_PASSWORD", SECRET)
    auth = client_auth(_args("--mi", "https://ops@127.0.0.1:1/mi"))
    assert auth is not None and (auth.user, auth.password) == ("ops", SECRET)
    monkeypatch.setenv("EVENT_DATAGRAM_MI_USER", "envuser")
    auth = client_auth(_args("--mi", HTTPS))
    assert auth is not None and auth.user == "envuser"
    auth = client_auth(_args("--mi", HTTPS, "--user", "flag"))  # the flag wins
    assert auth is not None and auth.user == "flag"
    # $EVENT_DATAGRAM_MI still names the target
    monkeypatch.setenv("EVENT_DATAGRAM_MI", "https://ops@127.0.0.1:2/mi")
    assert _args().mi == "https://ops@127.0.0.1:2/mi"
    # Credentials in the environment are for HTTP MIs; a UDP MI ignores them.
    assert client_auth(_args("--mi", "udp:127.0.0.1:8559")) is None


def test_no_password_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # Not even as an abbreviation of --password-file, and the value is never echoed.
    for argv in (["--password", SECRET], [f"--password={SECRET}"], ["--passw", SECRET]):
        with pytest.raises(SystemExit) as info:
            build_parser(["events"]).parse_args(["events", *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "there is no --password" in err or "ambiguous" in err
        assert SECRET not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mi", f"https://ops:{SECRET}@127.0.0.1:1/mi"], "a password in the MI URL is refused"),
        (["--mi", f"http://ops:{SECRET}@127.0.0.1:1/mi"], "--password-file PATH or $EVENT_"),
        (["--mi", HTTPS, "--user", "ops"], "user 'ops' needs a password: --password-file"),
        (["--mi", "udp:127.0.0.1:1", "--user", "ops"], "--user is for an http:// or https://"),
        (["--mi", "http://127.0.0.1:1/mi", "--ca-file", "x"], "are for an https:// MI"),
        (["--mi", HTTPS, "--key-file", "k"], "--key-file needs --cert-file"),
        (["--mi", HTTPS, "--user", "a:b", "--password-file", "PW"], "has no ':'"),
        (["--mi", HTTPS, "--user", "ops", "--password-file", "/nonexistent/pw"],
         "cannot read the password file /nonexistent/pw"),
    ],
)  # fmt: skip
def test_unusable_options_say_why(argv: list[str], message: str, password_file: Path) -> None:
    argv = [str(password_file) if a == "PW" else a for a in argv]
    with pytest.raises(ValueError) as info:
        client_auth(_args(*argv))
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_a_password_alone_needs_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_DATAGRAM_MI_PASSWORD", SECRET)
    with pytest.raises(ValueError, match="a password needs a user"):
        client_auth(_args("--mi", HTTPS))


def test_password_files(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b"one\r\n")
    assert read_password_file(str(path)) == "one"
    path.write_bytes(b"\n")
    with pytest.raises(MIClientError, match="is empty"):
        read_password_file(str(path))
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(MIClientError, match="not UTF-8"):
        read_password_file(str(path))


def test_the_library_refuses_a_url_password_and_never_shows_one() -> None:
    with pytest.raises(MIClientError) as info:
        http_post(f"https://u:{SECRET}@127.0.0.1:1/mi", b"{}", 0.0, 100)
    assert SECRET not in str(info.value) and "refused" in str(info.value)
    assert shown("https://ops@127.0.0.1:1/mi") == "https://127.0.0.1:1/mi"


INGEST = '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n[[upstream]]\n'


def test_upstream_auth_keys(password_file: Path) -> None:
    text = (
        f'{INGEST}mi = "https://127.0.0.1:1/mi"\nca_file = "{password_file}"\n'
        f'user = "ops"\npassword_file = "{password_file}"\n'
    )
    up = config.loads(text).upstream[0]
    assert (up.ca_file, up.user, up.password_file) == (
        str(password_file),
        "ops",
        str(password_file),
    )
    # the user may be the URL's
    text = f'{INGEST}mi = "https://ops@127.0.0.1:1/mi"\npassword_file = "{password_file}"\n'
    assert config.loads(text).upstream[0].user == ""


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (f'mi = "https://ops:{SECRET}@127.0.0.1:1/mi"', "a password in the MI URL is refused"),
        ('mi = "http://127.0.0.1:1/mi"\nca_file = "PW"', "ca_file is for an https:// MI - at"),
        ('mi = "https://127.0.0.1:1/mi"\nca_file = "/nonexistent"', "cannot be read - at"),
        ('mi = "https://127.0.0.1:1/mi"\nkey_file = "PW"', "key_file needs cert_file"),
        ('mi = "udp:127.0.0.1:1"\nuser = "ops"', "user is for an http:// or https:// MI"),
        ('mi = "https://127.0.0.1:1/mi"\nuser = "ops"', "needs password_file - at"),
        ('mi = "https://127.0.0.1:1/mi"\npassword_file = "PW"', "password_file needs a user"),
        ('mi = "https://o@127.0.0.1:1/mi"\npassword_file = "/nonexistent"',
         "No such file or directory - at `$.upstream[0].password_file`"),
        ('mi = "https://o@127.0.0.1:1/mi"\npassword_file = "EMPTY"', "is empty"),
    ],
)  # fmt: skip
def test_upstream_auth_errors_name_the_key(
    keys: str, message: str, password_file: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    keys = keys.replace('"PW"', f'"{password_file}"').replace('"EMPTY"', f'"{empty}"')
    with pytest.raises(config.ConfigError) as info:
        config.loads(INGEST + keys + "\n", "my.toml")
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_a_password_over_plain_http_beyond_loopback_is_warned(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVENT_DATAGRAM_MI_PASSWORD", SECRET)
    for target, warned in (
        ("http://192.0.2.7:8888/mi", True),
        ("http://mi.example:8888/mi", True),
        ("http://127.0.0.1:8888/mi", False),
        ("http://[::1]:8888/mi", False),
        ("http://localhost:8888/mi", False),
        ("https://192.0.2.7:8888/mi", False),
    ):
        ok, auth = _auth_or_usage(_args("--mi", target, "--user", "ops"))
        assert ok and auth is not None
        err = capsys.readouterr().err
        assert ("the password goes unencrypted" in err) == warned, target
        assert SECRET not in err
