"""[[stream]] url_file / url_env and amqp_url_file / amqp_url_env (issue 22 by issue
17's rule): the URLs off the command line, one way at a time, the same errors as
[[amqp]], and no error or name that shows a password."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import config
from engine.cli.main import _hide_passwords
from engine.errors import ConfigError
from engine.sources.stream_config import StreamConfig

SECRET = "s3cr3t-stream-pw"
URL = f"rabbitmq-stream://edg:{SECRET}@127.0.0.1:5599/vh"
AMQP_URL = f"amqp://dec:{SECRET}@127.0.0.1:5698/vh"


def stream_toml(body: str) -> str:
    return f"[[stream]]\n{body}\n"


def test_urls_from_a_file_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stream-url"
    path.write_text(f"\n{URL}\n# a comment line is not read\n")
    amqp_path = tmp_path / "amqp-url"
    amqp_path.write_text(f"{AMQP_URL}\n")
    cfg = config.loads(stream_toml(f'url_file = "{path}"\namqp_url_file = "{amqp_path}"'))
    stream = cfg.stream[0]
    assert stream.url_value() == URL
    assert stream.display_name() == "rabbitmq-stream://127.0.0.1:5599/vh opensips"
    assert stream.declare_endpoint() == ("127.0.0.1", 5698, "dec", SECRET, "vh")
    resolved = stream.resolved()  # what a source holds: read once, files no longer named
    assert (resolved.url, resolved.amqp_url) == (URL, AMQP_URL)
    assert resolved.url_file == resolved.amqp_url_file == ""
    monkeypatch.setenv("EDG_TEST_STREAM_URL", URL)
    monkeypatch.setenv("EDG_TEST_DECLARE_URL", AMQP_URL)
    cfg = config.loads(
        stream_toml('url_env = "EDG_TEST_STREAM_URL"\namqp_url_env = "EDG_TEST_DECLARE_URL"')
    )
    assert cfg.stream[0].url_value() == URL
    assert cfg.stream[0].declare_endpoint().port == 5698
    # No amqp_url: declare uses url's host, credentials and vhost on port 5672.
    cfg = config.loads(stream_toml('url_env = "EDG_TEST_STREAM_URL"'))
    assert cfg.stream[0].declare_endpoint() == ("127.0.0.1", 5672, "edg", SECRET, "vh")
    assert StreamConfig().url_value().startswith("rabbitmq-stream://guest:")  # the default


@pytest.mark.parametrize(
    ("body", "key", "why"),
    [
        (f'url = "{URL}"\nurl_env = "X"', "url_env", "set one of url, url_file, url_env"),
        ('url_file = "/f"\nurl_env = "X"', "url_env", "not url_file and url_env"),
        ('url_file = "/nonexistent/s-url"', "url_file", "cannot read '/nonexistent/s-url'"),
        ('url_env = "EDG_TEST_UNSET_VAR"', "url_env", "EDG_TEST_UNSET_VAR is not set or empty"),
        (
            f'amqp_url = "{AMQP_URL}"\namqp_url_file = "/f"',
            "amqp_url_file",
            "set one of amqp_url, amqp_url_file, amqp_url_env, not amqp_url and amqp_url_file",
        ),
        (
            'amqp_url_env = "EDG_TEST_UNSET_VAR"',
            "amqp_url_env",
            "EDG_TEST_UNSET_VAR is not set or empty",
        ),
        (
            'amqp_url_file = "/nonexistent/a-url"',
            "amqp_url_file",
            "cannot read '/nonexistent/a-url'",
        ),
    ],
)
def test_errors_name_the_key(body: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.loads(stream_toml(body))
    assert why in str(raised.value) and f"at `$.stream[0].{key}`" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_a_bad_url_in_a_file_or_variable_is_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stream-url"
    path.write_text(f"http://edg:{SECRET}@127.0.0.1/\n")
    with pytest.raises(ConfigError, match=r"\*\*\*@127.0.0.1.*stream\[0\]\.url_file") as raised:
        config.loads(stream_toml(f'url_file = "{path}"'))
    assert SECRET not in str(raised.value)
    # A stream URL where declare wants AMQP: refused at amqp_url_file, unshown.
    path.write_text(f"{URL}\n")
    with pytest.raises(ConfigError, match=r"\*\*\*@127.*amqp_url_file") as raised:
        config.loads(stream_toml(f'amqp_url_file = "{path}"'))
    assert SECRET not in str(raised.value)
    monkeypatch.setenv("EDG_TEST_STREAM_URL", f"rabbitmq-stream://edg:{SECRET}@127.0.0.1:nope/")
    with pytest.raises(ConfigError, match=r"bad port - at `\$\.stream\[0\]\.url_env`") as raised:
        config.loads(stream_toml('url_env = "EDG_TEST_STREAM_URL"'))
    assert SECRET not in str(raised.value)
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty: expected the broker URL"):
        config.loads(stream_toml(f'url_file = "{path}"'))


def test_run_stream_url_is_hidden_and_nothing_else_is() -> None:
    assert not _hide_passwords(["event-datagram", "run", "--stream", "rabbitmq-stream://h/%2F"])
    assert not _hide_passwords(["event-datagram", "run", "--stream-url-file", "/run/secret"])
