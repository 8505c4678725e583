"""engine/mi/http.py's parsing: bytes in, a request or a status out, no socket."""

from __future__ import annotations

import pytest

from engine.mi.http import (
    Request,
    Status,
    body_length,
    parse_head,
    parse_request_line,
    response,
)


def _request(line: bytes, head: bytes = b"\r\n") -> Request:
    request = parse_request_line(line)
    assert isinstance(request, Request)
    assert parse_head(request, head) is None
    return request


def test_request_line_taken() -> None:
    request = parse_request_line(b"POST //mi HTTP/1.1\r\n")
    assert isinstance(request, Request)
    assert (request.method, request.path, request.version, request.close) == (
        "POST",
        "/mi",  # never taken for a host, as http.server
        "HTTP/1.1",
        False,
    )
    old = parse_request_line(b"GET /metrics HTTP/1.0\r\n")
    assert isinstance(old, Request) and old.close
    simple = parse_request_line(b"GET /health\r\n")
    assert isinstance(simple, Request) and simple.version == "HTTP/0.9" and simple.close


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/x.y\r\n", 400),
        (b"GET / HTTP/2.0\r\n", 505),
        (b"GET / a b HTTP/1.1\r\n", 400),
        (b"POST /mi\r\n", 400),  # HTTP/0.9 knows only GET
        (b"\xff\xfe / HTTP/1.1 extra words\r\n", 400),
    ],
)
def test_request_line_refused(line: bytes, status: int) -> None:
    parsed = parse_request_line(line)
    assert isinstance(parsed, Status) and parsed.status == status and parsed.message


def test_empty_line_closes_without_answer() -> None:
    assert parse_request_line(b"\r\n") is None


def test_head_sets_headers_and_close() -> None:
    request = _request(b"POST /mi HTTP/1.1\r\n", b"Host: x\r\nConnection: close\r\n\r\n")
    assert request.headers["Host"] == "x" and request.close
    keep = _request(b"POST /mi HTTP/1.0\r\n", b"Connection: keep-alive\r\n\r\n")
    assert not keep.close
    many = parse_request_line(b"POST /mi HTTP/1.1\r\n")
    assert isinstance(many, Request)
    bad = parse_head(many, b"".join(b"X-%d: y\r\n" % k for k in range(200)) + b"\r\n")
    assert isinstance(bad, Status) and bad.status == 431


@pytest.mark.parametrize(
    ("head", "want"),
    [
        (b"Content-Length: 12\r\n\r\n", 12),
        (b"Content-Length: 0\r\n\r\n", 0),
        (b"\r\n", 411),
        (b"Transfer-Encoding: chunked\r\n\r\n", 501),
        (b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"Content-Length: -1\r\n\r\n", 400),
        (b"Content-Length: 99999999999999999999\r\n\r\n", 400),
        (b"Content-Length: 101\r\n\r\n", 413),
    ],
)
def test_body_length(head: bytes, want: int) -> None:
    got = body_length(_request(b"POST /mi HTTP/1.1\r\n", head), max_body=100)
    if isinstance(got, Status):
        assert got.status == want
    else:
        assert want == got and want < 100


def test_response_bytes() -> None:
    request = _request(b"GET /health HTTP/1.1\r\n")
    reply = response(request, 200, b"OK\n", "text/plain", close=True)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"OK\n"
    assert b"Content-Length: 3" in head and b"Connection: close" in head
    assert response(_request(b"HEAD / HTTP/1.1\r\n"), 200, b"x", close=False).endswith(b"\r\n\r\n")
    assert response(_request(b"GET /health\r\n"), 200, b"OK\n", close=True) == b"OK\n"
