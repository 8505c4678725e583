"""The MI transports' parsing, without a server: listen addresses (engine.mi.server)
and where a FIFO request ends (engine.mi.fifo)."""

from __future__ import annotations

import pytest

from engine.mi.fifo import json_end
from engine.mi.server import format_listen, parse_listen


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8888") == ("127.0.0.1", 8888)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("") is None and parse_listen("off") is None
    assert format_listen(("::1", 80)) == "[::1]:80"
    for bad in ("localhost:80", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ":80", "1.2.3.4:٣"):
        with pytest.raises(ValueError, match=r"expected|not an IP|port"):
            parse_listen(bad)


def test_json_end() -> None:
    text = b'  {"a":"}\\"{","b":[1,{"c":"]"}]} tail'
    end, _ = json_end(text, 2)
    assert text[2:end] == b'{"a":"}\\"{","b":[1,{"c":"]"}]}'
    state = None
    for cut in range(3, len(text)):  # fed piece by piece, it resumes where it stopped
        end, state = json_end(text[:cut], 2, state)
        if end is not None:
            assert text[2:end].endswith(b"]}")
            break
    assert json_end(b'{"a":"\\', 0)[0] is None
    # Requests may span lines, but a line starting with ':' is the next request.
    assert json_end(b'{"a":\n 1}', 0)[0] == 9
    assert json_end(b'{"a":\n', 0)[0] is None
    assert json_end(b'{"a":[1,\n:next:{}', 0)[0] == 8
    assert json_end(b'{"a":"unclosed\n:next:{}', 0)[0] == 14
