"""engine.mi.protocol / engine.mi.commands against a real engine: the JSON-RPC envelope,
recipes and parameter types, each command's results and errors, and a
hypothesis fuzz of handle() itself. (The captured vectors: test_mi_vectors.py.)"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.mi.dispatch import handle
from engine.producer import Engine
from engine.wire import MAX_PAYLOAD
from tests.helpers.mi import ONE_WORKER, STATIC, mi
from tests.helpers.support import eventually, udp_receiver

EVENTS = ["E_SAMPLE", "E_BENCH", "E_STATIC"]
OK = b'{"jsonrpc":"2.0","result":"OK","id":1}'


# The module's shared `engine` (conftest.py).
ENGINE = {"events": EVENTS, "static": [("E_STATIC", STATIC)], **ONE_WORKER}


def req(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        request["params"] = params
    return request


def err(code: int, message: str, data: str | None = None, id_: str = "1") -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    body = json.dumps(error, separators=(",", ":"))
    return f'{{"jsonrpc":"2.0","error":{body},"id":{id_}}}'.encode()


def invalid_params(data: str, id_: str = "1") -> bytes:
    return err(-32602, "Invalid params", data, id_)


# -- the envelope -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "data"),
    [
        (b'{"jsonrpc":"2.0",', None),
        (b"", None),
        (b"{'jsonrpc': '2.0'}", None),
        (b'{"jsonrpc":"2.0","id":1,"method":"which"} x', None),
        (b"[1, 2", None),
        (b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}', "invalid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"which","params":' + b"[" * 50_000,
            "JSON nested too deeply",
        ),
    ],
)
def test_parse_errors(engine: Engine, request_bytes: bytes, data: str | None) -> None:
    assert handle(engine, request_bytes) == err(-32700, "Parse error", data, "null")


@pytest.mark.parametrize(
    ("request_text", "id_"),
    [
        ("[]", "null"),
        ('[{"jsonrpc":"2.0","id":1,"method":"which"}]', "null"),  # no batches, like OpenSIPS
        ('"which"', "null"),
        ("null", "null"),
        ('{"jsonrpc":"2.0","id":1}', "1"),
        ('{"jsonrpc":"2.0","id":1,"method":7}', "1"),
        ('{"id":"a","method":"which"}', '"a"'),
        ('{"jsonrpc":"1.0","id":1,"method":"which"}', "1"),
        ('{"jsonrpc":2.0,"id":1,"method":"which"}', "1"),
        ('{"jsonrpc":"2.0","id":{"a":1},"method":"which"}', "null"),
        ('{"jsonrpc":"2.0","id":[1],"method":"which"}', "null"),
        ('{"jsonrpc":"2.0","id":true,"method":"which"}', "null"),
        ('{"jsonrpc":"2.0","id":1,"method":"which","params":"x"}', "1"),
        ('{"jsonrpc":"2.0","id":1,"method":"which","params":null}', "1"),
        ('{"jsonrpc":"2.0","id":1,"method":"which","params":5}', "1"),
        ('{"jsonrpc":"2.0","method":"which","params":5}', "null"),  # answered without an id too
    ],
)
def test_invalid_requests(engine: Engine, request_text: str, id_: str) -> None:
    reply = mi(engine, request_text)
    assert reply is not None
    assert reply.startswith(b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"')
    assert reply.endswith(b',"id":' + id_.encode() + b"}")


@pytest.mark.parametrize(
    "id_text",
    ['"1"', "7", "-3", "1.5", "1e3", '"\\u00e9"', '"é"', "123456789012345678901234567890"],
)
def test_id_is_echoed_as_given(engine: Engine, id_text: str) -> None:
    reply = mi(engine, f'{{"jsonrpc":"2.0","id":{id_text},"method":"events_list"}}')
    assert reply is not None and reply.endswith(b',"id":' + id_text.encode() + b"}")
    assert json.loads(reply)["id"] == json.loads(id_text)


def test_numbers_out_of_range(engine: Engine) -> None:
    reply = mi(engine, '{"jsonrpc":"2.0","id":1,"method":"which","params":[1e999]}')
    assert reply == err(-32700, "Parse error", "Number out of range", "1")
    reply = mi(
        engine,
        '{"jsonrpc":"2.0","id":1,"method":"raise_event","params":["E_BENCH","{\\"a\\":-1e999}"]}',
    )
    assert reply == err(400, "Bad Params", id_="1")


def test_null_id_is_a_request_not_a_notification(engine: Engine) -> None:
    reply = mi(engine, '{"jsonrpc":"2.0","id":null,"method":"which","params":["version"]}')
    assert reply == b'{"jsonrpc":"2.0","result":[[]],"id":null}'


def test_notifications_get_no_reply_but_run(engine: Engine) -> None:
    sock = "udp:127.0.0.1:9101"
    note = {"jsonrpc": "2.0", "method": "event_subscribe", "params": ["E_BENCH", sock, 60]}
    assert mi(engine, note) is None
    with engine.lock:
        assert engine.registry.find("E_BENCH", sock) is not None
    for method in ("nope", "event_subscribe", "raise_event"):  # errors: no reply either
        assert mi(engine, {"jsonrpc": "2.0", "method": method, "params": ["E_NOPE"]}) is None
    assert mi(engine, {**note, "params": ["E_BENCH", sock, 0]}) is None
    with engine.lock:
        assert engine.registry.find("E_BENCH", sock) is None


@pytest.mark.parametrize("empty", [[], {}])
def test_empty_params_are_no_params(engine: Engine, empty: Any) -> None:
    assert mi(engine, req("events_list", empty)) == mi(engine, req("events_list"))
    assert mi(engine, req("event_subscribe", empty)) == invalid_params(
        "Too few or too many parameters"
    )


# -- names and recipes ---------------------------------------------------------------------------

ALIASES = [
    (
        "event_subscribe",
        "evi:subscribe",
        "subscribe",
        [["event", "socket"], ["event", "socket", "expire"]],
    ),
    ("events_list", "evi:list", "list", [[]]),
    ("subscribers_list", "evi:subscribers", "subscribers", [[], ["event"], ["event", "socket"]]),
    ("raise_event", "evi:raise", "raise", [["event"], ["event", "params"]]),
    ("which", "core:which", "which", [[], ["command"]]),
    ("version", "core:version", "version", [[]]),
    ("uptime", "core:uptime", "uptime", [[]]),
]


@pytest.mark.parametrize(("legacy", "name", "local", "recipes"), ALIASES)
def test_every_name_and_its_recipes(
    engine: Engine, legacy: str, name: str, local: str, recipes: list[list[str]]
) -> None:
    want = msgspec.json.encode({"jsonrpc": "2.0", "result": recipes, "id": 1})
    for alias in {legacy, name, local}:
        assert mi(engine, req("which", {"command": alias})) == want
        assert mi(engine, req("which", [alias])) == want
    if not recipes[0]:  # commands without params answer the same under every name
        replies = {mi(engine, req(alias)) for alias in (legacy, name, local) if alias != "uptime"}
        assert len(replies) <= 1


@pytest.mark.parametrize("method", ["nope", "evi:nope", "core:", ":list", "evi:", "EVENTS_LIST"])
def test_unknown_methods(engine: Engine, method: str) -> None:
    assert mi(engine, req(method)) == err(-32601, "Method not found", id_="1")
    assert mi(engine, req("which", [method])) == err(404, "unknown MI command")


@pytest.mark.parametrize(
    ("method", "params", "data"),
    [
        ("events_list", ["x"], "Too few or too many parameters"),
        ("events_list", {"x": 1}, "Too few or too many parameters"),
        ("which", {"cmd": "version"}, "Named parameters do not match"),
        ("event_subscribe", {"event": "E_SAMPLE", "socket": "udp:127.0.0.1:9", "x": 1},
         "Named parameters do not match"),
        ("raise_event", {"params": "{}"}, "Named parameters do not match"),
        ("raise_event", ["E_SAMPLE", "{}", "x"], "Too few or too many parameters"),
        ("subscribers_list", ["a", "b", "c"], "Too few or too many parameters"),
    ],
)  # fmt: skip
def test_params_that_match_no_recipe(engine: Engine, method: str, params: Any, data: str) -> None:
    assert mi(engine, req(method, params)) == invalid_params(data)


# -- parameter types (OpenSIPS's get_mi_int_param / get_mi_string_param) -------------------------


@pytest.mark.parametrize(
    ("expire", "stored"),
    [("30", 30), (1.5, 1), (59.99, 59), ("+40", 40), (1e12, 2**31 - 1), ("2147483647", 2**31 - 1)],
)
def test_expire_conversions(engine: Engine, expire: Any, stored: int) -> None:
    sock = "udp:127.0.0.1:9102"
    assert mi(engine, req("event_subscribe", ["E_SAMPLE", sock, expire])) == OK
    with engine.lock:
        found = engine.registry.find("E_SAMPLE", sock)
    assert found is not None and found.expire == stored
    assert mi(engine, req("event_subscribe", ["E_SAMPLE", sock, 0])) == OK


@pytest.mark.parametrize(
    ("expire", "data"),
    [
        (-5, "Negative expire value"),
        (-0.5 - 2**40, "Negative expire value"),
        ("-1", "Negative expire value"),
        ("abc", "Bad type for parameter 'expire'"),
        ("1.5", "Bad type for parameter 'expire'"),
        ("2147483648", "Bad type for parameter 'expire'"),
        ("", "Bad type for parameter 'expire'"),
        (True, "Bad type for parameter 'expire'"),
        (None, "Bad type for parameter 'expire'"),
        ([1], "Bad type for parameter 'expire'"),
        ({"a": 1}, "Bad type for parameter 'expire'"),
    ],
)
def test_bad_expire(engine: Engine, expire: Any, data: str) -> None:
    assert mi(engine, req("event_subscribe", ["E_SAMPLE", "udp:127.0.0.1:9103", expire])) == (
        invalid_params(data)
    )


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (["", "udp:127.0.0.1:9"], invalid_params("Bad type for parameter 'event'")),
        ([None, "udp:127.0.0.1:9"], invalid_params("Bad type for parameter 'event'")),
        (["E_SAMPLE", True], invalid_params("Bad type for parameter 'socket'")),
        (["E_SAMPLE", ["udp:127.0.0.1:9"]], invalid_params("Bad type for parameter 'socket'")),
        ([5, "udp:127.0.0.1:9"], err(400, "Bad parameter value")),  # a number is used as "5"
        (["E_SAMPLE", 9000], err(400, "Bad parameter value")),
        (["E_SAMPLE", "udp:127.0.0.1:9\x00"], err(400, "Bad parameter value")),
        (["E_SAMPLE", "udp:999.1.1.1:9"], err(400, "Bad parameter value")),
    ],
)
def test_string_params(engine: Engine, params: list[Any], reply: bytes) -> None:
    assert mi(engine, req("event_subscribe", params)) == reply


def test_allow_list_refusal_names_the_problem(engine: Engine) -> None:
    reply = mi(engine, req("event_subscribe", ["E_SAMPLE", "udp:10.1.2.3:9000"]))
    assert reply is not None
    error = json.loads(reply)["error"]
    assert (error["code"], error["message"]) == (400, "Bad parameter value")
    assert "udp:10.1.2.3:9000" in error["data"] and "allow-list" in error["data"]


# -- listings ---------------------------------------------------------------------------------


def test_listing_shapes(engine: Engine) -> None:
    static = (
        '{"name":"E_STATIC","id":2,"Subscribers":'
        '[{"socket":"udp:127.0.0.1:9999","expire":"never"}]}'
    )
    assert mi(engine, req("subscribers_list")) == (
        b'{"jsonrpc":"2.0","result":{"Events":[' + static.encode() + b']},"id":1}'
    )
    assert mi(engine, req("subscribers_list", ["E_BENCH"])) == (
        b'{"jsonrpc":"2.0","result":{"Event":{}},"id":1}'
    )
    assert mi(engine, req("subscribers_list", {"event": "E_STATIC", "socket": STATIC})) == (
        b'{"jsonrpc":"2.0","result":{"Event":{"name":"E_STATIC","id":2,"Subscriber":'
        b'{"socket":"udp:127.0.0.1:9999","expire":"never"}}},"id":1}'
    )
    # Exact matching: neither a prefix nor a longer address matches.
    for other in ("udp:127.0.0.1:999", "udp:127.0.0.1:99999", "udp:127.0.0.10:9999"):
        assert mi(engine, req("subscribers_list", ["E_STATIC", other])) == (
            err(404, "Subscriber does not exist")
        )
    assert mi(engine, req("subscribers_list", ["E_NOPE", STATIC])) == err(
        404, "Event not published"
    )
    assert mi(engine, req("events_list")) == (
        b'{"jsonrpc":"2.0","result":{"Events":[{"name":"E_SAMPLE","id":0},'
        b'{"name":"E_BENCH","id":1},{"name":"E_STATIC","id":2}]},"id":1}'
    )


# -- raise_event -------------------------------------------------------------------------------


def test_raise_event_results_and_datagrams(engine: Engine) -> None:
    rx = udp_receiver()
    try:
        assert mi(engine, req("event_subscribe", ["E_SAMPLE", rx.socket_text, 60])) == OK
        cases: list[tuple[Any, bytes | None, bytes]] = [
            (None, OK, b'{"jsonrpc":"2.0","method":"E_SAMPLE"}'),
            ('{"ip":"1.2.3.4","n":7}', OK, b'"params":{"ip":"1.2.3.4","n":7}}'),
            ('{"f":-2.9,"u":4294967296,"m":-1}', OK, b'"params":{"f":-2.9,"u":4294967296,"m":-1}}'),
            ('{"s":"\\u00e9 \\ud83d\\ude00 \\u0001"}', OK, '{"s":"é 😀 \\u0001"}}'.encode()),
            ([["x", {"y": None}], 1.5, False], OK, b'"params":[["x",{"y":null}],1.5,false]}'),
            ("{}", OK, b'"params":{}}'),
            ([], OK, b'{"jsonrpc":"2.0","method":"E_SAMPLE"}'),
        ]  # fmt: skip
        for i, (params, reply, tail) in enumerate(cases, 1):
            args = ["E_SAMPLE"] if params is None else ["E_SAMPLE", params]
            assert mi(engine, req("raise_event", args)) == reply
            got = rx.wait_for(i)
            assert len(got) == i and got[-1].endswith(tail), (params, got[-1])
        bad = err(400, "Bad Params")
        for params, reply in [
            ("[1,2]", bad), ("hello", bad), ('"{}"', bad), ("5", bad), (5, bad), (2.5, bad),
            ('{"s":"\\ud800"}', bad), ('{"a":' + "[" * 5000 + "]" * 5000 + "}", bad),
            ({"ip": "1.2.3.4"}, err(400, "No Params")), (True, err(400, "No Params")),
            (None, err(400, "No Params")),
        ]:  # fmt: skip
            assert mi(engine, req("raise_event", ["E_SAMPLE", params])) == reply, params
        for params, key in [  # re-encoded, a repeated key would lose a value: at any depth
            ('{"ip":"1.2.3.4","ip":"5.6.7.8"}', "ip"), ('{"a":{"b":1,"b":2}}', "b"),
            ('{"a":[{"c":1,"\\u0063":2}]}', "c"),
        ]:  # fmt: skip
            reply = err(400, "Bad Params", f"key {key!r} given twice")
            assert mi(engine, req("raise_event", ["E_SAMPLE", params])) == reply, params
        assert mi(engine, req("raise_event", ["E_NOPE", "{}"])) == err(404, "Event not registered")
        assert mi(engine, req("raise_event", ["E_NOPE", "bad"])) == err(404, "Event not registered")
        assert mi(engine, req("raise_event", {"event": "E_BENCH"})) == (
            err(480, "Temporarily Unavailable")
        )
        assert len(rx.quiet(0.1)) == len(cases)
        assert mi(engine, req("event_subscribe", ["E_SAMPLE", rx.socket_text, 0])) == OK
        assert mi(engine, req("raise_event", ["E_SAMPLE"])) == err(480, "Temporarily Unavailable")
    finally:
        rx.close()


def test_oversize_payload_is_an_error_and_counted(engine: Engine) -> None:
    assert mi(engine, req("event_subscribe", ["E_BENCH", "udp:127.0.0.1:9104", 60])) == OK
    before = engine.oversize[1]
    overhead = len(b'{"jsonrpc":"2.0","method":"E_BENCH","params":{"big":""}}')
    fits = json.dumps({"big": "x" * (MAX_PAYLOAD - overhead)})
    assert mi(engine, req("raise_event", ["E_BENCH", fits])) == OK
    too_big = json.dumps({"big": "x" * (MAX_PAYLOAD - overhead + 1)})
    reply = mi(engine, req("raise_event", ["E_BENCH", too_big]))
    assert reply is not None
    error = json.loads(reply)["error"]
    assert (error["code"], error["message"]) == (400, "Payload Too Large")
    assert f"{MAX_PAYLOAD + 1} bytes" in error["data"] and f"{MAX_PAYLOAD}-byte" in error["data"]
    assert engine.oversize[1] == before + 1
    assert mi(engine, req("event_subscribe", ["E_BENCH", "udp:127.0.0.1:9104", 0])) == OK


def test_full_ring_drop_is_reported(make_engine: Callable[..., Engine]) -> None:
    """A stopped worker's ring fills up: the MI says the event was dropped (503)."""
    engine = make_engine(["E_FULL"], ring_bytes=262144, **ONE_WORKER)
    assert mi(engine, req("event_subscribe", ["E_FULL", "udp:127.0.0.1:9105", 60])) == OK
    pid = engine.supervisor.pid_of(0)
    assert pid is not None
    big = json.dumps({"big": "x" * 60000})
    os.kill(pid, signal.SIGSTOP)
    try:
        replies = [mi(engine, req("raise_event", ["E_FULL", big])) for _ in range(8)]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert replies[0] == OK
    dropped = json.loads(replies[-1] or b"{}")["error"]
    assert (dropped["code"], dropped["message"]) == (503, "Event Dropped")
    assert "ring full" in dropped["data"]
    assert engine.drops["ring_full"] >= 1


def test_state_file_failure_is_a_server_error(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    state = tmp_path / "missing-dir" / "state.json"
    engine = make_engine(["E_A"], state_file=str(state), **ONE_WORKER)
    reply = mi(engine, req("event_subscribe", ["E_A", "udp:127.0.0.1:9106", 60]))
    assert reply is not None
    error = json.loads(reply)["error"]
    assert (error["code"], error["message"]) == (-32000, "Server error")
    assert "state file" in error["data"]
    assert mi(engine, req("subscribers_list", ["E_A"])) == (
        b'{"jsonrpc":"2.0","result":{"Event":{}},"id":1}'
    )


# -- fuzz --------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_names = [name for row in ALIASES for name in row[:3]]
_method = st.sampled_from([*_names, "nope", "", "core:", "evi:"]) | st.text(max_size=10)
_event = st.sampled_from(["E_SAMPLE", "E_BENCH", "E_NOPE", "", "E_STATIC"]) | st.text(max_size=6)
_socket = st.sampled_from(
    ["udp:127.0.0.1:9", "udp:127.0.0.1:0", "unix:/tmp/edg-fuzz.sock", "/tmp/edg-fuzz2",
     "udp:[::1]:9", "udp:10.0.0.1:9", "tcp:1.2.3.4:5", "udp:localhost:9", "", "foo"]
)  # fmt: skip
_value = _event | _socket | _json | st.sampled_from(['{"a":1}', "[1]", "30", "-1", 1.5, 0])
_params = st.one_of(
    st.none(),
    _json,
    st.lists(_value, max_size=4),
    st.dictionaries(
        st.sampled_from(["event", "socket", "expire", "params", "command", "x"]), _value
    ),
)
_request = st.fixed_dictionaries(
    {"method": _method},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]) | _json,
        "id": _json,
        "params": _params,
    },
)


def _check_reply(request: bytes, reply: bytes | None) -> None:
    if reply is None:
        return
    decoded = json.loads(reply)
    assert isinstance(decoded, dict) and list(decoded) in (
        ["jsonrpc", "result", "id"],
        ["jsonrpc", "error", "id"],
    )
    assert decoded["jsonrpc"] == "2.0" and ("result" in decoded) != ("error" in decoded)
    if "error" in decoded:
        assert isinstance(decoded["error"]["code"], int)
        assert isinstance(decoded["error"]["message"], str)
        assert decoded["error"]["code"] != -32000, (request, reply)  # never an internal failure


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_request)
def test_fuzz_structured_requests(engine: Engine, request: dict[str, Any]) -> None:
    data = json.dumps(request).encode()
    reply = handle(engine, data)
    _check_reply(data, reply)
    id_ = request.get("id", [])
    if id_ is None or (isinstance(id_, str | int | float) and not isinstance(id_, bool)):
        assert reply is not None  # a request with an id always gets an answer


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(engine: Engine, data: bytes) -> None:
    _check_reply(data, handle(engine, data))


_TOKENS = [
    "{", "}", "[", "]", ":", ",", " ", '"jsonrpc"', '"2.0"', '"id"', '"method"', '"params"',
    "1", "-0", "1e999", "-1e999", "1.5", "9" * 30, "null", "true", "false", '"which"',
    '"event_subscribe"', '"raise_event"', '"subscribers_list"', '"E_SAMPLE"', '"E_BENCH"',
    '"udp:127.0.0.1:9"', '"unix:/tmp/x"', '"{}"', '"{\\"a\\":1e999}"', '"\\ud800"',
    '"\\u0000"', '"event"', '"socket"', '"expire"', '"command"', "[" * 40, '"\\"',
]  # fmt: skip
_PREFIX = '{"jsonrpc":"2.0","id":1,"method":'


@settings(max_examples=400, deadline=None)
@given(tokens=st.lists(st.sampled_from(_TOKENS), max_size=30), prefixed=st.booleans())
def test_fuzz_token_soup(engine: Engine, tokens: list[str], prefixed: bool) -> None:
    data = ((_PREFIX if prefixed else "") + "".join(tokens)).encode()
    _check_reply(data, handle(engine, data))


def test_engine_still_answers_after_fuzz(engine: Engine) -> None:
    reply = mi(engine, req("events_list"))
    assert reply is not None and json.loads(reply)["result"]["Events"][:3] == [
        {"name": "E_SAMPLE", "id": 0},
        {"name": "E_BENCH", "id": 1},
        {"name": "E_STATIC", "id": 2},
    ]
    rx = udp_receiver()
    try:
        assert mi(engine, req("event_subscribe", ["E_BENCH", rx.socket_text, 60])) == OK
        for n in range(20):
            assert mi(engine, req("raise_event", ["E_BENCH", json.dumps({"n": n})])) == OK
        eventually(lambda: len(rx.datagrams) >= 20, what="20 datagrams")
        want = [
            f'{{"jsonrpc":"2.0","method":"E_BENCH","params":{{"n":{n}}}}}'.encode()
            for n in range(20)
        ]
        assert [d for d in rx.quiet(0.1) if b'"n":' in d] == want
    finally:
        rx.close()
