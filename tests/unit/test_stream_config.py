"""[[stream]] (engine/sources/stream_config.py): defaults, errors naming the key,
URLs, offsets, names."""

from __future__ import annotations

import socket

import pytest

from engine import config
from engine.errors import ConfigError
from engine.sources.stream_config import StreamConfig, endpoint, offset_spec


def test_the_commented_stream_example_is_the_defaults() -> None:
    lines = config.default_text().split("# [[stream]]\n", 1)[1].split("\n\n", 1)[0]
    example = "[[stream]]\n" + "\n".join(line.removeprefix("# ") for line in lines.splitlines())
    assert config.loads(example).stream == [StreamConfig()]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('url = "http://h/"', "expected rabbitmq-stream:// or amqp://USER:PASS@HOST:PORT/VHOST"),
        ('url = "rabbitmq-stream://u:secret@h:99999/"', "bad port - at `$.stream[0].url`"),
        ('amqp_url = "rabbitmq-stream://h/"', "expected amqp://USER:PASS@HOST:PORT/VHOST - at"),
        ('stream = ""', "of 1 to 255 bytes - at `$.stream[0].stream`"),
        ('offset = "middle"', "'middle': expected next, first, last, an offset"),
        ('offset = "timestamp:x"', "at `$.stream[0].offset`"),
        ("max_age_ms = -1", "expected 0 to 2147483647 - at `$.stream[0].max_age_ms`"),
        ("store_every_messages = 0", "at `$.stream[0].store_every_messages`"),
        ("store_every_ms = 1", "at `$.stream[0].store_every_ms`"),
        ("binding_keys = []", "no routing keys"),
        ('retention_max_age = "1 hour"', "at `$.stream[0].retention_max_age`"),
        ("retention_max_bytes = -1", "at `$.stream[0].retention_max_bytes`"),
        ("prefetch = 10", "unknown field `prefetch` - at `$.stream[0]`"),
    ],
)
def test_stream_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.loads(f"[[stream]]\n{text}\n").validate()
    assert error in str(caught.value)
    assert "secret" not in str(caught.value)


def test_one_consumer_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"same stream and consumer twice - at `\$.stream\[1\]`"):
        config.loads('[[stream]]\nconsumer = "a"\n[[stream]]\nconsumer = "a"\n').validate()
    config.loads('[[stream]]\nconsumer = "a"\n[[stream]]\nconsumer = "b"\n').validate()


def test_urls_and_names() -> None:
    ep = endpoint("rabbitmq-stream://u%40x:p%3Aw@h.example/v%2Fh", ("rabbitmq-stream",), 5552)
    assert ep == ("h.example", 5552, "u@x", "p:w", "v/h")
    assert endpoint("amqp://h:1234/%2F", ("amqp",), 5552).vhost == "/"
    cfg = StreamConfig(url="rabbitmq-stream://u:secret@10.0.0.7:5553/%2F", stream="s")
    assert cfg.display_name() == "rabbitmq-stream://10.0.0.7:5553/%2F s"
    assert cfg.declare_endpoint() == ("10.0.0.7", 5672, "u", "secret", "/")
    assert cfg.consumer_name("edge") == f"edge@{socket.gethostname()}"
    assert StreamConfig(consumer="me").consumer_name("edge") == "me"


def test_offsets_and_declare_arguments() -> None:
    assert offset_spec("next") == ("next", None)
    assert offset_spec("42") == ("offset", 42)
    assert offset_spec("timestamp:1700000000000") == ("timestamp", 1700000000000)
    cfg = StreamConfig(retention_max_age="7D", retention_max_bytes=10, retention_segment_bytes=5)
    assert cfg.declare_arguments() == {
        "x-queue-type": "stream",
        "x-max-age": "7D",
        "x-max-length-bytes": 10,
        "x-stream-max-segment-size-bytes": 5,
    }
    assert StreamConfig(retention_max_age="").declare_arguments() == {"x-queue-type": "stream"}
