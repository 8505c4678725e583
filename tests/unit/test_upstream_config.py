"""[[upstream]]: its config keys, their errors, `run --upstream`, and the documented
recipe (docs/opensips.md) (the processes themselves: tests/integration/test_upstream.py)."""

from __future__ import annotations

import re

import pytest

from engine import config
from engine.cli.main import _apply_flags, build_parser
from tests.helpers.support import REPO

INGEST = '[ingest]\nlisten = ["udp:127.0.0.1:0"]\n'


def test_an_upstream_and_its_defaults() -> None:
    cfg = config.loads(INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:8080"\n')
    assert cfg.upstream == [
        config.UpstreamConfig(mi="udp:127.0.0.1:8080", events=["*"], socket="", expire=120)
    ]
    text = (
        INGEST
        + '[[upstream]]\nmi = "http://127.0.0.1:8888/mi"\nevents = ["E_A", "E_B"]\n'
        + 'socket = "unix:/run/edg/ingest.sock"\nexpire = 3600\n'
        + '[[upstream]]\nmi = "fifo:/run/opensips/fifo"\n'
    )
    cfg = config.loads(text)
    assert [u.mi for u in cfg.upstream] == ["http://127.0.0.1:8888/mi", "fifo:/run/opensips/fifo"]
    assert cfg.upstream[0].events == ["E_A", "E_B"] and cfg.upstream[0].expire == 3600
    assert cfg.upstream[0].max_reply_bytes == 4 << 20  # the default
    text = INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nmax_reply_bytes = 65536\n'
    assert config.loads(text).upstream[0].max_reply_bytes == 65536


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[upstream]]\nmi = "udp:127.0.0.1:8080"\n',
         "ingest.listen is empty - at `$.upstream[0]`"),
        (INGEST + "[[upstream]]\n", "missing required field `mi` - at `$.upstream[0]`"),
        (INGEST + '[[upstream]]\nmi = "127.0.0.1:8080"\n',
         "expected udp:IP:PORT, http://HOST:PORT/mi or fifo:PATH - at `$.upstream[0].mi`"),
        (INGEST + '[[upstream]]\nmi = "udp:localhost:8080"\n', "is not an IP address"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:0"\n', "with a port"),
        (INGEST + '[[upstream]]\nmi = "fifo:"\n', "no path - at `$.upstream[0].mi`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\n[[upstream]]\nmi = "udp:127.0.0.1:1"\n',
         "is named twice - at `$.upstream[1].mi`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nevents = []\n',
         "no events"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nevents = ["*", "E_A"]\n',
         "name none with it - at `$.upstream[0].events`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nevents = ["E_A", "bad name"]\n',
         "at `$.upstream[0].events[1]`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nsocket = "tcp:1.2.3.4:5"\n',
         "at `$.upstream[0].socket`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nexpire = 5\n',
         "expire 5: expected 6 to 2147483647 seconds - at `$.upstream[0].expire`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nmax_reply_bytes = 100\n',
         "max_reply_bytes 100: expected 4096 to 1073741824 - at `$.upstream[0].max_reply_bytes`"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nmax_reply_bytes = 2147483648\n',
         "at `$.upstream[0].max_reply_bytes`"),
        ('[ingest]\nlisten = ["udp:0.0.0.0:9050"]\n[[upstream]]\nmi = "udp:127.0.0.1:1"\n',
         "is a wildcard address"),
        (INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nsockets = ""\n',
         "unknown field `sockets`"),
    ],
)  # fmt: skip
def test_upstream_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text, "my.toml")
    assert str(info.value).startswith("config error in my.toml: ")
    assert message in str(info.value)


def test_a_wildcard_ingest_with_the_socket_named() -> None:
    text = (
        '[ingest]\nlisten = ["udp:0.0.0.0:9050"]\n'
        '[[upstream]]\nmi = "udp:10.0.0.5:8080"\nsocket = "udp:10.0.0.1:9050"\n'
    )
    assert config.loads(text).upstream[0].socket == "udp:10.0.0.1:9050"


def test_run_upstream_flags_add_upstreams_of_every_event() -> None:
    cfg = config.loads(INGEST + '[[upstream]]\nmi = "udp:127.0.0.1:1"\nevents = ["E_A"]\n')
    argv = ["run", "--upstream", "udp:127.0.0.1:8080", "--upstream", "http://127.0.0.1:8888/mi"]
    _apply_flags(cfg, build_parser(argv).parse_args(argv))
    assert [(u.mi, u.events) for u in cfg.upstream] == [
        ("udp:127.0.0.1:1", ["E_A"]),
        ("udp:127.0.0.1:8080", ["*"]),
        ("http://127.0.0.1:8888/mi", ["*"]),
    ]
    argv = ["run", "--upstream", "udp:127.0.0.1:8080"]  # and no ingest socket
    with pytest.raises(config.ConfigError, match=r"bad option: .*ingest\.listen is empty"):
        _apply_flags(config.Config(), build_parser(argv).parse_args(argv))
    argv = ["run", "--ingest", "udp:127.0.0.1:0", "--upstream", "udp:127.0.0.1:8080"]
    cfg = config.Config()
    _apply_flags(cfg, build_parser(argv).parse_args(argv))
    assert [(u.mi, u.events, u.socket) for u in cfg.upstream] == [("udp:127.0.0.1:8080", ["*"], "")]


def test_the_documented_recipe_is_a_valid_config() -> None:
    text = (REPO / "docs" / "opensips.md").read_text()
    section = text[text.index("## Recipe 1") :]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    cfg = config.loads(blocks[0], "docs/opensips.md")
    assert cfg.ingest.listen == ["udp:127.0.0.1:9050"]
    assert [(u.mi, u.events, u.socket, u.expire) for u in cfg.upstream] == [
        ("udp:127.0.0.1:8080", ["E_PIKE_BLOCKED"], "", 120)
    ]
