"""[[amqp]] url_file / url_env (issue 17, item 7): the broker URL off the command
line, one way at a time, and no error or name that shows its password."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import config
from engine.cli.main import _hide_passwords
from engine.errors import ConfigError
from engine.sources.amqp import AmqpConfig

SECRET = "s3cr3t-pw"
URL = f"amqp://edg:{SECRET}@127.0.0.1:5679/%2F"


def amqp_toml(body: str) -> str:
    return f"[[amqp]]\n{body}\n"


def test_url_from_a_file_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "amqp-url"
    path.write_text(f"\n{URL}\n# a comment line is not read\n")
    cfg = config.loads(amqp_toml(f'url_file = "{path}"'))
    assert cfg.amqp[0].url_value() == URL
    assert SECRET not in cfg.amqp[0].display_name()
    assert cfg.amqp[0].display_name() == "amqp://127.0.0.1:5679/%2F opensips"
    monkeypatch.setenv("EDG_TEST_AMQP_URL", URL)
    cfg = config.loads(amqp_toml('url_env = "EDG_TEST_AMQP_URL"'))
    assert cfg.amqp[0].url_value() == URL
    assert AmqpConfig().url_value().startswith("amqp://guest:")  # the default stays


@pytest.mark.parametrize(
    ("body", "key", "why"),
    [
        (f'url = "{URL}"\nurl_env = "X"', "url_env", "set one of url, url_file, url_env"),
        ('url_file = "/f"\nurl_env = "X"', "url_env", "not url_file and url_env"),
        ('url_file = "/nonexistent/amqp-url"', "url_file", "cannot read '/nonexistent/amqp-url'"),
        ('url_env = "EDG_TEST_UNSET_VAR"', "url_env", "EDG_TEST_UNSET_VAR is not set or empty"),
    ],
)
def test_errors_name_the_key(body: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.loads(amqp_toml(body))
    assert why in str(raised.value) and f"at `$.amqp[0].{key}`" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_a_bad_url_in_a_file_or_variable_is_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "amqp-url"
    path.write_text(f"http://edg:{SECRET}@127.0.0.1/\n")
    with pytest.raises(ConfigError, match=r"\*\*\*@127.0.0.1.*url_file") as raised:
        config.loads(amqp_toml(f'url_file = "{path}"'))
    assert SECRET not in str(raised.value)
    monkeypatch.setenv("EDG_TEST_AMQP_URL", f"amqp://edg:{SECRET}@127.0.0.1:notaport/")
    with pytest.raises(ConfigError, match=r"bad port - at `\$\.amqp\[0\]\.url_env`") as raised:
        config.loads(amqp_toml('url_env = "EDG_TEST_AMQP_URL"'))
    assert SECRET not in str(raised.value)
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty: expected the broker URL"):
        config.loads(amqp_toml(f'url_file = "{path}"'))


def test_nothing_to_hide_leaves_the_title_alone() -> None:
    assert not _hide_passwords(["event-datagram", "run", "--amqp", "amqp://127.0.0.1/%2F"])
    assert not _hide_passwords(["event-datagram", "run", "--amqp-url-file", "/run/secret"])
