"""engine/config.py and engine/default.toml: every key, its default, its errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine import config
from engine.cli.main import _apply_flags, build_parser
from engine.options import EngineOptions
from tests.helpers.support import REPO

CONFIGURATION = REPO / "docs" / "configuration.md"  # the key table


def keys(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key of a TOML document (tables recursed, arrays not)."""
    out = []
    for key, item in value.items():
        path = f"{prefix}{key}"
        out += keys(item, path + ".") if isinstance(item, dict) else [path]
    return out


def struct_keys(struct: type[msgspec.Struct], prefix: str = "") -> list[str]:
    out = []
    for field in msgspec.structs.fields(struct):
        kind = field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            out += struct_keys(kind, f"{prefix}{field.name}.")
        else:
            out.append(f"{prefix}{field.name}")
    return out


def test_default_toml_is_the_struct_defaults() -> None:
    assert config.load(None) == config.Config()
    shipped = tomllib.loads(config.default_text())
    # default.toml spells out every key except the (commented) static subscriptions
    # upstreams and broker queues.
    assert sorted(keys(shipped)) == sorted(
        k
        for k in struct_keys(config.Config)
        if k not in ("subscription", "upstream", "amqp", "stream")
    )
    assert config.Config().events[0] == "E_PIKE_BLOCKED"
    assert config.Config().mi.http == "127.0.0.1:8558"
    assert config.Config().mi.datagram == "127.0.0.1:8559"


def test_every_key_is_documented_in_the_configuration_table() -> None:
    """Every key of the config structs has its row (`| `key` | default | meaning |`)."""
    text = CONFIGURATION.read_text()
    rows = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    sub_keys = [f"subscription.{f.name}" for f in msgspec.structs.fields(config.StaticSubscription)]
    sub_keys += [f"upstream.{f.name}" for f in msgspec.structs.fields(config.UpstreamConfig)]
    sub_keys += [f"amqp.{f.name}" for f in msgspec.structs.fields(config.AmqpConfig)]
    sub_keys += [f"stream.{f.name}" for f in msgspec.structs.fields(config.StreamConfig)]
    for key in [*struct_keys(config.Config), *sub_keys]:
        assert f"| `{key}` |" in rows, f"docs/configuration.md does not document `{key}`"


def test_a_full_config(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    path.write_text(
        """
events = ["E_A", "E_B"]
allow = ["10.0.0.0/8", "unix:/run/app/"]
[engine]
instance = "full"
workers = 2
cpus = [1]
pin = false
ring_bytes = 1048576
full_ring_policy = "wait"
full_ring_wait_ms = 2
batch_max = 64
drain_timeout_s = 1.5
max_events = 16
use_sendmmsg = false
socket_limit = 10
sndbuf_bytes = 65536
runtime_dir = "/run/edg"
[mi]
http = "[::1]:9000"
datagram = ""
fifo = "/run/edg/mi.fifo"
fifo_reply_dir = "/run/edg"
[state]
enabled = true
file = "/var/lib/edg/state.json"
[metrics]
per_subscriber = true
[[subscription]]
event = "E_A"
socket = "udp:10.1.2.3:9999"
[[subscription]]
event = "E_C"
socket = "unix:/run/app/c.sock"
"""
    )
    cfg = config.load(str(path))
    assert cfg.engine.workers == 2 and cfg.engine.full_ring_policy == "wait"
    assert cfg.engine.full_ring_wait_ms == 2.0
    assert cfg.mi.http == "[::1]:9000" and cfg.mi.datagram == ""
    assert [s.event for s in cfg.subscription] == ["E_A", "E_C"]
    assert cfg.state_path() == "/var/lib/edg/state.json"
    assert cfg.metrics.per_subscriber is True
    assert str(cfg.allow_list()) == "10.0.0.0/8, unix:/run/app/"


def test_state_path_and_allow_list_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    cfg = config.loads(f'[engine]\ninstance = "i1"\nruntime_dir = "{tmp_path}"\n')
    assert cfg.state_path() == f"{tmp_path}/state/i1.state.json"  # state survives a reboot
    assert cfg.legacy_state_paths()[0] == f"{tmp_path}/i1.state.json"  # where 0.1 kept it
    assert f"unix:{tmp_path}/" in str(cfg.allow_list()) and "127.0.0.0/8" in str(cfg.allow_list())
    assert config.loads("[state]\nenabled = false\n").state_path() is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[engine]\nworkers = "two"', "Expected `int`, got `str` - at `$.engine.workers`"),
        ("[engine]\nworkers = -1", "must be 0-256 - at `$.engine.workers`"),
        ("[engine]\nring_bytes = 1000", "must be 262144-4294967296 (4 GiB) - at `$.engine.ring_bytes`"),  # noqa: E501
        ('[engine]\nfull_ring_policy = "block"', "'block' - at `$.engine.full_ring_policy`"),
        ("[engine]\nthreads = 4", "Object contains unknown field `threads` - at `$.engine`"),
        ("worker = 4", "Object contains unknown field `worker`"),
        ("[mi]\nhttp = 8888", "Expected `str`, got `int` - at `$.mi.http`"),
        ('[mi]\nhttp = "localhost:8888"', "'localhost' is not an IP address - at `$.mi.http`"),
        ('[mi]\ndatagram = "127.0.0.1"', "expected HOST:PORT, e.g. 1"),
        ('[mi]\nfifo_reply = "/tmp"', "Object contains unknown field `fifo_reply` - at `$.mi`"),
        ("[state]\nenabled = 1", "Expected `bool`, got `int` - at `$.state.enabled`"),
        ('[metrics]\nper_subscriber = "y"', "got `str` - at `$.metrics.per_subscriber`"),
        ('events = ["E A"]', "'E A': expected 1-255 printable ASCII characters"),
        ('events = "E_A"', "Expected `array`, got `str` - at `$.events`"),
        ('allow = ["nonsense"]', "allow-list item 'nonsense'"),
        ('allow = ["unix:relative/"]', "a UNIX prefix must be absolute - at `$.allow`"),
        ('[[subscription]]\nevent = "E_A"', "required field `socket` - at `$.subscription[0]`"),
        ('[[subscription]]\nevent = "E_A"\nsocket = "tcp:1.2.3.4:5"', "unknown transport 'tcp'"),
        ('[[subscription]]\nevent = "E"\nsocket = "udp:1.2.3.4:5"\nexpire = 5', "field `expire`"),
        ("events = [", "TOML syntax:"),
        ('[engine]\ninstance = "a b"', "instance name 'a b': use 1-48 letters"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text, "my.toml")
    assert str(info.value).startswith("config error in my.toml: ")
    assert message in str(info.value)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(
        config.ConfigError, match=r"config error in .*missing\.toml: cannot read it"
    ):
        config.load(str(tmp_path / "missing.toml"))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(config.ConfigError, match="cannot read it"):
        config.load(str(binary))


def test_run_flags_override_the_config() -> None:
    cfg = config.loads('events = ["E_A"]\nallow = ["10.0.0.0/8"]\n[engine]\nworkers = 3\n')
    argv = [
        "run", "--http", "127.0.0.1:1", "--mi-datagram", "", "--mi-fifo", "/tmp/f",
        "--event", "E_X", "--event", "E_Y", "--workers", "1", "--state-file", "/tmp/s.json",
        "--allow", "127.0.0.0/8", "--instance", "flags",
    ]  # fmt: skip
    args = build_parser(argv).parse_args(argv)
    _apply_flags(cfg, args)
    assert (cfg.mi.http, cfg.mi.datagram, cfg.mi.fifo) == ("127.0.0.1:1", "", "/tmp/f")
    assert cfg.events == ["E_X", "E_Y"] and cfg.allow == ["127.0.0.0/8"]
    assert cfg.engine == EngineOptions(instance="flags", workers=1)
    assert cfg.state_path() == "/tmp/s.json"
    for bad, message in ((["--workers", "-2"], "must be 0-256"), (["--http", "x"], "HOST:PORT")):
        args = build_parser(["run", *bad]).parse_args(["run", *bad])
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            _apply_flags(config.Config(), args)


def test_the_commented_amqp_example_is_the_defaults() -> None:
    lines = config.default_text().split("# [[amqp]]\n", 1)[1].splitlines()
    example = "[[amqp]]\n" + "\n".join(line.removeprefix("# ") for line in lines)
    assert config.loads(example).amqp == [config.AmqpConfig()]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('url = "http://h/"', "expected amqp://USER:PASS@HOST:PORT/VHOST - at `$.amqp[0].url`"),
        ('url = "amqp://u:secret@h:99999/"', "bad port - at `$.amqp[0].url`"),
        ('url = "amqp:///x"', "no host - at `$.amqp[0].url`"),
        ('exchange = ""', "default exchange cannot be bound) - at `$.amqp[0].exchange`"),
        ("binding_keys = []", "no routing keys"),
        ("prefetch = 0", "0: expected 1 to 65535 - at `$.amqp[0].prefetch`"),
        ("max_age_ms = -1", "expected 0 to 2147483647 - at `$.amqp[0].max_age_ms`"),
        ('exchange_type = "x-delayed"', "at `$.amqp[0].exchange_type`"),
        ("prefech = 10", "unknown field `prefech` - at `$.amqp[0]`"),
        (f'binding_keys = ["{"k" * 256}"]', "over 255 bytes - at `$.amqp[0].binding_keys[0]`"),
        # what pika would refuse in the source's thread is a config error (pika's words)
        (
            'url = "amqp://u:secret@h:5672/%2F?heartbeat=abc"',
            "Invalid heartbeat value 'abc'",
        ),
        ('url = "amqp://u:secret@h/%2F?heartbeat=abc"', "- at `$.amqp[0].url`"),
        ('url = "amqp://u:secret@h/%2F?hearbeat=5"', "Unknown URL parameter: 'hearbeat'"),
        ('url = "amqp://u:secret@h/%2F?channel_max=0"', "channel_max must be <= 65535"),
        ("max_message_bytes = 1023", "1023: expected 1024 to 2147483647 - at"),
        ("max_message_bytes = 2147483648", "`$.amqp[0].max_message_bytes`"),
    ],
)
def test_amqp_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(f"[[amqp]]\n{text}\n").validate()
    assert error in str(info.value)
    assert "secret" not in str(info.value)  # credentials are never echoed


def test_the_same_amqp_queue_twice_is_refused() -> None:
    twice = r"the same queue and keys twice - at `\$.amqp\[1\]`"
    with pytest.raises(config.ConfigError, match=twice):
        config.loads('[[amqp]]\nqueue = "q"\n[[amqp]]\nqueue = "q"\n').validate()


def test_run_amqp_flags_add_broker_queues_with_the_defaults() -> None:
    from engine.cli.main import _apply_flags, build_parser

    cfg = config.loads('[[amqp]]\nexchange = "mine"\n')
    argv = ["run", "--amqp", "amqp://u:p@10.0.0.7:5672/%2F", "--amqp", "amqp://127.0.0.1/v"]
    _apply_flags(cfg, build_parser(argv).parse_args(argv))
    assert [(a.url, a.exchange, a.binding_keys, a.queue) for a in cfg.amqp] == [
        ("amqp://guest:guest@127.0.0.1:5672/%2F", "mine", ["#"], ""),
        ("amqp://u:p@10.0.0.7:5672/%2F", "opensips", ["#"], ""),
        ("amqp://127.0.0.1/v", "opensips", ["#"], ""),
    ]
    argv = ["run", "--amqp", "rabbitmq://u:secret@h/"]
    with pytest.raises(config.ConfigError, match=r"bad option: .*expected amqp://") as info:
        _apply_flags(config.Config(), build_parser(argv).parse_args(argv))
    assert "secret" not in str(info.value)
