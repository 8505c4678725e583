"""engine.mi.fifo's framing without a FIFO: where a request ends in what was read."""

from __future__ import annotations

from engine.mi.fifo import json_end


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
