"""engine.wire: the datagram bytes, checked against a real OpenSIPS's captures."""

from __future__ import annotations

import ast
import enum
import json
import math
import pickle
import types
from collections import OrderedDict
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.wire import (
    MAX_PAYLOAD,
    NotificationRejected,
    PayloadTooLarge,
    WireError,
    check_notification,
    encode_notification,
    repeated_key,
)
from tests.helpers.captures import ALL_CAPTURES, WIRE, Capture
from tests.helpers.support import VECTORS

WIRE_TXT = VECTORS / "wire_samples.txt"
MISSING = f"OpenSIPS test vectors not found at {VECTORS} (they are part of the repository)"

# Captured datagrams that are OpenSIPS bugs we deliberately do not replicate
# (MEASUREMENTS.md 4.2, vectors/README.md "Where we deliberately do better"):
KNOWN_BUGS = {
    # MI array params become an object with duplicate empty keys, {"":"a","":"b"};
    # a Python mapping cannot even express it (we send a JSON array instead).
    "mi_raise: positional: array params (strings)",
    # Several non-scalar values in one request: garbage from a use-after-free in
    # mi_raise_event_json_params ("t":"\"x\"", "arr":"\u0002"); it changed between runs.
    "mi_raise: named: JSON types string",
}


EXPRESSIBLE = [c for c in ALL_CAPTURES if c.name not in KNOWN_BUGS]
BIG = [] if WIRE is None else WIRE["big"]


class DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise DuplicateKeyError(f"duplicate keys in {keys}")
    return dict(pairs)


def _decode_capture(payload: bytes) -> tuple[str, Any]:
    """(method, params) of a captured payload; params None when the key is absent."""
    doc = json.loads(payload, object_pairs_hook=_no_duplicates)
    assert list(doc)[:2] == ["jsonrpc", "method"]
    assert set(doc) <= {"jsonrpc", "method", "params"}
    assert doc["jsonrpc"] == "2.0"
    return doc["method"], doc.get("params")


# --- the captures -----------------------------------------------------------


def test_vectors_present() -> None:
    assert WIRE is not None, MISSING
    assert WIRE_TXT.is_file(), MISSING
    assert len(ALL_CAPTURES) >= 17
    assert len(BIG) >= 4


def test_known_bugs_are_in_the_captures() -> None:
    """The filter names real samples, so it cannot silently go stale."""
    assert WIRE is not None, MISSING
    names = {c.name for c in ALL_CAPTURES}
    assert names >= KNOWN_BUGS
    assert len(EXPRESSIBLE) == len(ALL_CAPTURES) - len(KNOWN_BUGS)


def test_only_known_bugs_have_duplicate_keys() -> None:
    assert WIRE is not None, MISSING
    duplicated = set()
    for capture in ALL_CAPTURES:
        try:
            _decode_capture(capture.payload)
        except DuplicateKeyError:
            duplicated.add(capture.name)
    assert duplicated == {"mi_raise: positional: array params (strings)"}


def test_text_samples_match_json_capture() -> None:
    """wire_samples.txt lists the same datagrams as wire.json, bytes and hex."""
    assert WIRE_TXT.is_file(), MISSING
    lines = WIRE_TXT.read_text(encoding="utf-8").splitlines()
    from_txt = set()
    for i, line in enumerate(lines):
        if line.startswith("bytes: "):
            payload = ast.literal_eval(line.removeprefix("bytes: "))
            assert lines[i + 1] == "hex: " + payload.hex()
            from_txt.add(payload)
    assert from_txt == {c.payload for c in ALL_CAPTURES}


@pytest.mark.parametrize("capture", EXPRESSIBLE, ids=[c.name for c in EXPRESSIBLE])
def test_captured_datagram_byte_exact(capture: Capture) -> None:
    method, params = _decode_capture(capture.payload)
    assert encode_notification(method, params) == capture.payload


@pytest.mark.parametrize("capture", EXPRESSIBLE, ids=[c.name for c in EXPRESSIBLE])
def test_captured_datagram_byte_exact_as_tuple_or_mapping(capture: Capture) -> None:
    """The same bytes through the slow path (non-dict mapping, tuple for a list)."""
    method, params = _decode_capture(capture.payload)
    if isinstance(params, dict):
        params = types.MappingProxyType(params)
    elif isinstance(params, list):
        params = tuple(params)
    assert encode_notification(method, params) == capture.payload


@pytest.mark.parametrize("sample", BIG, ids=[str(s["target_total_len"]) for s in BIG])
def test_captured_big_datagrams(sample: dict[str, Any]) -> None:
    """OpenSIPS's size-limit samples: {"big":"xxx..."} of a given total length."""
    total, biglen = sample["target_total_len"], sample["biglen"]
    params = {"big": "x" * biglen}
    payload = encode_notification("E_SAMPLE", params, limit=1 << 30)
    assert len(payload) == total
    for dgram in sample["datagrams"]:
        assert dgram["len"] == total
        assert payload.startswith(ast.literal_eval(dgram["head_repr"]))
        assert payload.endswith(ast.literal_eval(dgram["tail_repr"]))
        assert dgram["sha_all_x_in_big"] == biglen
    if total <= MAX_PAYLOAD:
        assert encode_notification("E_SAMPLE", params) == payload
    else:  # OpenSIPS sent these (or failed in the kernel); we refuse them up front
        with pytest.raises(PayloadTooLarge) as info:
            encode_notification("E_SAMPLE", params)
        assert info.value.size == total


def test_big_overhead_matches_capture() -> None:
    assert WIRE is not None, MISSING
    assert len(encode_notification("E_SAMPLE", {"big": ""})) == WIRE["big_overhead"] == 57


# --- MEASUREMENTS.md section 4 tables, spelled out ----------------------------

SECTION_4 = [
    pytest.param(
        "E_SAMPLE",
        {"count": 7, "ip": "192.168.2.11"},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"count":7,"ip":"192.168.2.11"}}',
        id="named str+int",
    ),
    pytest.param(
        "E_SAMPLE",
        ["third", 42, "first"],
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":["third",42,"first"]}',
        id="array",
    ),
    pytest.param("E_SAMPLE", None, b'{"jsonrpc":"2.0","method":"E_SAMPLE"}', id="no params"),
    pytest.param("E_SAMPLE", [], b'{"jsonrpc":"2.0","method":"E_SAMPLE"}', id="empty array"),
    pytest.param("E_SAMPLE", (), b'{"jsonrpc":"2.0","method":"E_SAMPLE"}', id="empty tuple"),
    pytest.param(
        "E_SAMPLE",
        {},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{}}',
        id="empty object",
    ),
    pytest.param(
        "E_SAMPLE",
        {"s": 'q"uote b\\ack nl\nnl tab\tt é 😀 end/slash'},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"s":"q\\"uote b\\\\ack nl\\nnl tab\\tt '
        b'\xc3\xa9 \xf0\x9f\x98\x80 end/slash"}}',
        id="special chars",
    ),
    pytest.param(
        "E_SAMPLE",
        {"s": 'q"uote b\\ack nl\nnl tab\tt ctl\x01 é 😀 /slash'},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"s":"q\\"uote b\\\\ack nl\\nnl tab\\tt '
        b'ctl\\u0001 \xc3\xa9 \xf0\x9f\x98\x80 /slash"}}',
        id="special chars with a control char",
    ),
    pytest.param(
        "E_SAMPLE",
        {"s": "é 😀 \x01 \x1f \x7f"},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"s":"\xc3\xa9 \xf0\x9f\x98\x80 '
        b'\\u0001 \\u001f \x7f"}}',
        id="raw utf-8, lowercase u-escapes, raw DEL",
    ),
    pytest.param(
        "E_SAMPLE",
        {"ké": "v", "empty": "", "zero": 0, "neg": -5},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"k\xc3\xa9":"v","empty":"","zero":0,'
        b'"neg":-5}}',
        id="neg/zero/empty/unicode key",
    ),
    pytest.param(
        "E_SAMPLE",
        {"c": "2", "b": "1"},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"c":"2","b":"1"}}',
        id="numeric-looking strings stay strings",
    ),
    pytest.param(
        "E_SAMPLE",
        {"": "7"},
        b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":{"":"7"}}',
        id="empty key",
    ),
    pytest.param(
        "E_BENCH",
        {"tag": "bench-payload-padding-0123456789ab", "count": 7, "ip": "192.168.2.11"},
        b'{"jsonrpc":"2.0","method":"E_BENCH","params":{"tag":"bench-payload-padding-0123456789ab",'
        b'"count":7,"ip":"192.168.2.11"}}',
        id="E_BENCH 120 bytes",
    ),
    pytest.param(
        "E_PIKE_BLOCKED",
        {"ip": "192.168.2.11"},
        b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}',
        id="SPEC example",
    ),
]


@pytest.mark.parametrize(("method", "params", "expected"), SECTION_4)
def test_section_4_cases(method: str, params: Any, expected: bytes) -> None:
    assert encode_notification(method, params) == expected


def test_bench_payload_is_120_bytes() -> None:
    params = {"tag": "bench-payload-padding-0123456789ab", "count": 7, "ip": "192.168.2.11"}
    assert len(encode_notification("E_BENCH", params)) == 120


def test_order_given_is_order_sent() -> None:
    assert encode_notification("E", {"b": 1, "a": 2}) == (
        b'{"jsonrpc":"2.0","method":"E","params":{"b":1,"a":2}}'
    )
    assert encode_notification("E", OrderedDict([("z", 1), ("y", 2)])) == (
        b'{"jsonrpc":"2.0","method":"E","params":{"z":1,"y":2}}'
    )


# --- cJSON escaping -----------------------------------------------------------


def cjson_string(text: str) -> bytes:
    """Independent reference: cJSON print_string_ptr, as OpenSIPS uses it."""
    out = bytearray(b'"')
    for char in text:
        code = ord(char)
        if char == '"':
            out += b'\\"'
        elif char == "\\":
            out += b"\\\\"
        elif char in "\b\f\n\r\t":
            out += {"\b": b"\\b", "\f": b"\\f", "\n": b"\\n", "\r": b"\\r", "\t": b"\\t"}[char]
        elif code < 0x20:
            out += b"\\u%04x" % code
        else:
            out += char.encode("utf-8")
    out += b'"'
    return bytes(out)


def _wrapped_value(method: str, json_value: bytes) -> bytes:
    return (
        b'{"jsonrpc":"2.0","method":'
        + cjson_string(method)
        + b',"params":{"s":'
        + json_value
        + b"}}"
    )


@pytest.mark.parametrize("code", range(0x80), ids=lambda c: f"0x{c:02x}")
def test_every_ascii_char_escaped_like_cjson(code: int) -> None:
    char = chr(code)
    got = encode_notification("E", {"s": char})
    assert got == _wrapped_value("E", cjson_string(char))


def test_escape_table_spelled_out() -> None:
    def value(char: str) -> bytes:
        got = encode_notification("E", [char])
        return got.removeprefix(b'{"jsonrpc":"2.0","method":"E","params":[').removesuffix(b"]}")

    assert value('"') == b'"\\""'
    assert value("\\") == b'"\\\\"'
    assert value("\b") == b'"\\b"'
    assert value("\f") == b'"\\f"'
    assert value("\n") == b'"\\n"'
    assert value("\r") == b'"\\r"'
    assert value("\t") == b'"\\t"'
    assert value("\x00") == b'"\\u0000"'
    assert value("\x1b") == b'"\\u001b"'
    assert value("\x1f") == b'"\\u001f"'
    assert value("\x7f") == b'"\x7f"'
    assert value("/") == b'"/"'
    assert value("\u2028") == b'"\xe2\x80\xa8"'
    assert value("\U0010ffff") == b'"\xf4\x8f\xbf\xbf"'


def test_keys_and_method_escaped_like_values() -> None:
    got = encode_notification('E"\n', {'k"\\\x01é': 1})
    assert got == (b'{"jsonrpc":"2.0","method":"E\\"\\n","params":{"k\\"\\\\\\u0001\xc3\xa9":1}}')


@given(st.text())
def test_any_text_escaped_like_cjson(text: str) -> None:
    assert encode_notification("E", {"s": text}) == _wrapped_value("E", cjson_string(text))
    assert encode_notification("E", {text: 1}) == (
        b'{"jsonrpc":"2.0","method":"E","params":{' + cjson_string(text) + b":1}}"
    )


# --- values beyond OpenSIPS -----------------------------------------------------


def test_values_beyond_opensips() -> None:
    params = {
        "f": 2.5,
        "whole": 1000.0,
        "t": True,
        "false": False,
        "n": None,
        "big": 2**100,
        "neg": -(2**70),
        "list": [1, "x", [], {}],
        "tuple": (1, 2),
        "obj": {"a": {"b": [None]}},
    }
    got = encode_notification("E", params)
    assert got == (
        b'{"jsonrpc":"2.0","method":"E","params":{"f":2.5,"whole":1000.0,"t":true,'
        b'"false":false,"n":null,"big":1267650600228229401496703205376,'
        b'"neg":-1180591620717411303424,"list":[1,"x",[],{}],"tuple":[1,2],'
        b'"obj":{"a":{"b":[null]}}}}'
    )
    assert json.loads(got)["params"]["big"] == 2**100


class Colour(enum.IntEnum):
    RED = 1


class Name(enum.StrEnum):
    PIKE = "E_PIKE_BLOCKED"


def test_subclasses_send_their_plain_value() -> None:
    class Text(str):
        def __str__(self) -> str:
            return "not this"

    params = {Text("k"): Text("v"), "c": Colour.RED, "m": types.MappingProxyType({"a": 1})}
    assert encode_notification(Name.PIKE, params) == (
        b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"k":"v","c":1,"m":{"a":1}}}'
    )


def test_other_sequences_are_arrays() -> None:
    assert encode_notification("E", range(3)) == b'{"jsonrpc":"2.0","method":"E","params":[0,1,2]}'
    assert encode_notification("E", range(0)) == b'{"jsonrpc":"2.0","method":"E"}'


def test_input_is_not_modified() -> None:
    params = {"a": [1, (2, 3)], "b": types.MappingProxyType({"c": Colour.RED})}
    before = repr(params)
    encode_notification("E", params)
    assert repr(params) == before


# --- size limit ------------------------------------------------------------------


def _sized(total: int) -> dict[str, str]:
    return {"big": "x" * (total - 57)}  # 57 = len of {"jsonrpc":"2.0","method":"E_SAMPLE",...}


def test_exactly_max_payload_is_accepted() -> None:
    payload = encode_notification("E_SAMPLE", _sized(MAX_PAYLOAD))
    assert len(payload) == MAX_PAYLOAD == 65457


def test_one_byte_over_is_rejected() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        encode_notification("E_SAMPLE", _sized(MAX_PAYLOAD + 1))
    err = info.value
    assert (err.event, err.size, err.limit) == ("E_SAMPLE", 65458, 65457)
    assert str(err) == "event E_SAMPLE payload is 65458 bytes, over the 65457-byte limit"
    assert isinstance(err, WireError)
    assert isinstance(err, ValueError)


def test_limit_counts_bytes_not_characters() -> None:
    # 100 two-byte characters: 200 bytes of value, 100 characters
    params = {"s": "é" * 100}
    size = len(encode_notification("E", params))
    assert size == len(b'{"jsonrpc":"2.0","method":"E","params":{"s":""}}') + 200
    assert len(encode_notification("E", params, limit=size)) == size
    with pytest.raises(PayloadTooLarge) as info:
        encode_notification("E", params, limit=size - 1)
    assert (info.value.size, info.value.limit) == (size, size - 1)


def test_limit_applies_to_events_without_params() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        encode_notification("E_X", limit=10)
    size = len(b'{"jsonrpc":"2.0","method":"E_X"}')
    assert (info.value.event, info.value.size, info.value.limit) == ("E_X", size, 10)


def test_payload_too_large_pickles() -> None:
    err = PayloadTooLarge("E_X", 70000, 65457)
    assert str(err) == "event E_X payload is 70000 bytes, over the 65457-byte limit"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.event, copy.size, copy.limit, str(copy)) == (
        "E_X",
        70000,
        65457,
        str(err),
    )


# --- errors ----------------------------------------------------------------------


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


ERRORS: list[Any] = [
    pytest.param("E", {"x": math.nan}, "params['x']: float nan is not valid JSON", id="nan"),
    pytest.param("E", {"x": math.inf}, "params['x']: float inf is not valid JSON", id="inf"),
    pytest.param(
        "E", [1, -math.inf], "params[1]: float -inf is not valid JSON", id="-inf in array"
    ),
    pytest.param(
        "E",
        {"a": [0, {"b": math.nan}]},
        "params['a'][1]['b']: float nan is not valid JSON",
        id="nested nan",
    ),
    pytest.param("E", {"x": b"ab"}, "params['x']: bytes is not a JSON value", id="bytes value"),
    pytest.param(
        "E", {"x": bytearray(b"a")}, "params['x']: bytearray is not a JSON value", id="bytearray"
    ),
    pytest.param("E", {3: "x"}, "params: key 3 is not a string", id="int key"),
    pytest.param("E", {"a": {None: 1}}, "params['a']: key None is not a string", id="nested key"),
    pytest.param("E", {"x": {1, 2}}, "params['x']: set is not a JSON value", id="set value"),
    pytest.param(
        "E", [frozenset()], "params[0]: frozenset is not a JSON value", id="frozenset in array"
    ),
    pytest.param("E", {"x": object()}, "params['x']: object is not a JSON value", id="object"),
    pytest.param(
        "E",
        {"x": "ok\ud800"},
        "params['x']: string is not valid UTF-8 (lone surrogate '\\ud800' at index 2)",
        id="lone surrogate value",
    ),
    pytest.param(
        "E",
        {"a": ["fine", {"\udfff": 1}]},
        "params['a'][1]: key '\\udfff' is not valid UTF-8 (lone surrogate '\\udfff' at index 0)",
        id="lone surrogate key",
    ),
    pytest.param(
        "E\udc80",
        None,
        "method: string is not valid UTF-8 (lone surrogate '\\udc80' at index 1)",
        id="lone surrogate method",
    ),
    pytest.param(
        "E",
        "ip=1.2.3.4",
        "params: str is not valid params (expected a mapping, a list/tuple, or None)",
        id="str params",
    ),
    pytest.param(
        "E",
        b"{}",
        "params: bytes is not valid params (expected a mapping, a list/tuple, or None)",
        id="bytes params",
    ),
    pytest.param(
        "E",
        5,
        "params: int is not valid params (expected a mapping, a list/tuple, or None)",
        id="int params",
    ),
    pytest.param(
        "E",
        {"a", "b"},
        "params: set is not valid params (expected a mapping, a list/tuple, or None)",
        id="set params",
    ),
    pytest.param("", None, "method: must be a non-empty string", id="empty method"),
    pytest.param(None, None, "method: must be a non-empty string", id="None method"),
    pytest.param(b"E", None, "method: must be a non-empty string", id="bytes method"),
    pytest.param(
        "E",
        _self_containing(),
        "params: nested too deeply (or contains itself)",
        id="self-containing list",
    ),
]


@pytest.mark.parametrize(("method", "params", "message"), ERRORS)
def test_errors_name_the_part(method: Any, params: Any, message: str) -> None:
    with pytest.raises(WireError) as info:
        encode_notification(method, params)
    assert str(info.value) == message
    assert type(info.value) is WireError


# --- properties --------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
PARAMS = (
    st.none()
    | st.lists(JSON_VALUES, max_size=6)
    | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6)
)
METHODS = st.text(min_size=1, max_size=20)


class Obj(NamedTuple):
    """A decoded JSON object, kept as ordered pairs so key order is compared too."""

    pairs: tuple[tuple[str, Any], ...]


def _as_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj(tuple((k, _as_pairs(v)) for k, v in value.items()))
    if isinstance(value, list):
        return [_as_pairs(v) for v in value]
    return value


def _decode_ordered(payload: bytes) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> Obj:
        return Obj(tuple(pairs))

    return json.loads(payload, object_pairs_hook=hook)


def _expected(method: str, params: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None and (isinstance(params, dict) or params):
        doc["params"] = params
    return doc


def _check_payload(payload: bytes, method: str, params: Any) -> None:
    # (a) decodes back to the notification, same key order everywhere
    assert _decode_ordered(payload) == _as_pairs(_expected(method, params))
    # (b) no raw control byte: every one of them is escaped
    assert not any(byte < 0x20 for byte in payload)
    # and valid UTF-8
    payload.decode("utf-8")


@settings(max_examples=300)
@given(METHODS, PARAMS)
def test_property_roundtrip(method: str, params: Any) -> None:
    try:
        payload = encode_notification(method, params)
    except PayloadTooLarge:  # not reachable with these sizes, but never silently over
        raise AssertionError("small params rejected as too large") from None
    assert len(payload) <= MAX_PAYLOAD
    _check_payload(payload, method, params)


@given(METHODS, PARAMS)
def test_property_slow_path_gives_the_same_bytes(method: str, params: Any) -> None:
    """A read-only mapping / a tuple goes through normalisation; the bytes must not change."""
    fast = encode_notification(method, params)
    if isinstance(params, dict):
        slow = encode_notification(method, types.MappingProxyType(params))
    elif isinstance(params, list):
        slow = encode_notification(method, tuple(params))
    else:
        slow = encode_notification(method, params)
    assert slow == fast


def _run_limit_property(limit: int) -> set[str]:
    seen: set[str] = set()

    @settings(max_examples=300)
    @given(METHODS, PARAMS)
    def check(method: str, params: Any) -> None:
        unlimited = encode_notification(method, params, limit=1 << 30)
        try:
            payload = encode_notification(method, params, limit=limit)
        except PayloadTooLarge as err:
            seen.add("rejected")
            assert err.size == len(unlimited) > limit
            assert (err.event, err.limit) == (method, limit)
            return
        seen.add("accepted")
        assert payload == unlimited
        assert len(payload) <= limit
        _check_payload(payload, method, params)

    check()
    return seen


def test_property_limit_never_silently_over() -> None:
    # (c) with a small limit, both branches are exercised: fits, or PayloadTooLarge
    assert _run_limit_property(200) == {"accepted", "rejected"}


@given(METHODS, PARAMS, st.sampled_from(["nan", "inf", "-inf"]))
def test_property_non_finite_float_anywhere_is_rejected(method: str, params: Any, bad: str) -> None:
    with pytest.raises(WireError) as info:
        encode_notification(method, {"p": {"ok": params, "bad": [float(bad)]}})
    assert str(info.value) == f"params['p']['bad'][0]: float {bad} is not valid JSON"


# --- received notifications: a key given twice (issue 19 item 6) ------------------------

ONCE = b'{"jsonrpc":"2.0","method":"E_A","params":{"ip":"1.2.3.4"}}'


@pytest.mark.parametrize(
    "data",
    [
        b'{"jsonrpc":"2.0","method":"E_A","method":"E_B"}',
        b'{"jsonrpc":"2.0","method":"E_B","params":{},"method":"E_A"}',
        b'{"jsonrpc":"2.0","jsonrpc":"2.0","method":"E_A"}',
        b'{"jsonrpc":"2.0","method":"E_A","params":{"a":1},"params":[2]}',
        b'{"jsonrpc":"2.0","method":"E_A","\\u006dethod":"E_B"}',  # the same key, escaped
        b'{"jsonrpc": "2.0", "method": "E_A", "method": "E_B"}',
        b'{ "method":"E_A","jsonrpc":"2.0","method":"E_A" }',  # even with the same value
        b'{"jsonrpc":"2.0","method":"E\\u005fB","method":"E_A"}',  # escapes in the method
        '{"jsonrpc":"2.0","method":"É","method":"E_A"}'.encode(),  # non-ASCII method
        # the shortest repeats msgspec takes (the size check's bound: 11 bytes)
        b'{"jsonrpc":"2.0","method":"E_A","params":0,"params":[]}',
        b'{"jsonrpc":"2.0","method":"","method":"E_A"}',
    ],
)
def test_a_top_level_key_given_twice_is_malformed(data: bytes) -> None:
    with pytest.raises(NotificationRejected) as info:
        check_notification(data)
    assert info.value.reason == "malformed"
    assert "given twice" in str(info.value)


def test_an_id_given_twice_is_malformed_too() -> None:
    with pytest.raises(NotificationRejected) as info:
        check_notification(b'{"jsonrpc":"2.0","method":"E_A","id":1,"id":2}')
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    ("data", "method"),
    [
        (ONCE, "E_A"),
        (b'{"jsonrpc":"2.0","method":"E_A"}', "E_A"),
        (b'{"jsonrpc": "2.0", "method": "E_A", "params": {"ip": "1"}}', "E_A"),  # json.dumps
        (b'{ "jsonrpc" : "2.0" ,\n "method" : "E_A" , "params" : [ ] }', "E_A"),
        (b'{"method":"E_A","params":[1],"jsonrpc":"2.0"}', "E_A"),  # any order
        # "method" and "params" named again inside params: not top-level keys
        (b'{"jsonrpc":"2.0","method":"E_A","params":{"method":"x","params":["method"]}}', "E_A"),
        (b'{"jsonrpc": "2.0", "method": "E_A", "params": {"q": "a \\"b\\""}}', "E_A"),
        # a key repeated inside params is forwarded as it came (OpenSIPS sends that)
        (b'{"jsonrpc":"2.0","method":"E_A","params":{"":"a","":"b"}}', "E_A"),
        (b'{"jsonrpc":"2.0","method":"E\\u005fA"}', "E_A"),  # escapes: the slow path
        ('{"jsonrpc":"2.0","method":"É"}'.encode(), "É"),
    ],
)
def test_each_key_once_is_accepted_however_written(data: bytes, method: str) -> None:
    assert check_notification(data) == method


def test_every_captured_opensips_datagram_is_accepted() -> None:
    """Including the one with a key repeated inside params ({"":"a","":"b"})."""
    assert WIRE is not None, MISSING
    for capture in ALL_CAPTURES:
        assert check_notification(capture.payload) == _decode_capture_method(capture.payload)


def _decode_capture_method(payload: bytes) -> str:
    method = json.loads(payload)["method"]
    assert isinstance(method, str)
    return method


_SPACE = st.sampled_from(["", " ", "\n", "\t ", "  "])


@settings(max_examples=300)
@given(METHODS, PARAMS, st.data())
def test_property_a_repeated_member_anywhere_is_rejected_and_none_accepted(
    method: str, params: Any, data: st.DataObject
) -> None:
    """The compact form, the same with whitespace, and either with one member given
    again (before or after the others, any value): only the last are rejected."""
    members = [("jsonrpc", "2.0"), ("method", method)]
    if params is not None:
        members.append(("params", params))
    members = data.draw(st.permutations(members))
    space = data.draw(_SPACE)

    def text(pairs: list[tuple[str, Any]], sep: str) -> bytes:
        body = (sep + "," + sep).join(
            json.dumps(k, ensure_ascii=False) + sep + ":" + sep + json.dumps(v, ensure_ascii=False)
            for k, v in pairs
        )
        return ("{" + sep + body + sep + "}").encode()

    for sep in ("", space):
        assert check_notification(text(members, sep)) == method
    again = data.draw(st.sampled_from(members))
    # A value msgspec takes for that key (so the repeat is the only fault), anywhere.
    valid = {"jsonrpc": ["2.0"], "method": [method, "E_OTHER"], "params": [{}, [1], params]}
    value = data.draw(st.sampled_from(valid[again[0]]))
    at = data.draw(st.integers(0, len(members)))
    doubled = [*members[:at], (again[0], value), *members[at:]]
    for sep in ("", space):
        with pytest.raises(NotificationRejected) as info:
            check_notification(text(doubled, sep))
        assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ('{"a":1,"b":2}', None),
        ('{"a":1,"a":1}', "a"),
        ('{"a":{"b":1,"b":2},"c":3}', "b"),  # at any depth
        ('{"a":[{"c":1,"\\u0063":2}]}', "c"),  # any spelling
        ('{"a":{"x":1},"b":{"x":1}}', None),  # the same key in two objects is no repeat
        (b'{"\xc3\xa9":1,"\\u00e9":2}', "é"),
    ],
)
def test_repeated_key_finds_a_key_given_twice_anywhere(doc: str | bytes, key: str | None) -> None:
    assert repeated_key(doc) == key


def test_repeated_key_refuses_what_it_cannot_parse() -> None:
    with pytest.raises(WireError):
        repeated_key("{nope")
