"""The datagrams a real OpenSIPS sent (tests/vectors/opensips/wire.json), loaded once
for every test that replays them: the wire tests and the ingest relay."""

from __future__ import annotations

import ast
from typing import Any, NamedTuple

from tests.helpers.support import VECTORS, load_vector

WIRE_JSON = VECTORS / "wire.json"


class Capture(NamedTuple):
    name: str
    payload: bytes


def _load_wire() -> dict[str, Any] | None:
    data: dict[str, Any] | None = load_vector(WIRE_JSON.name, missing_ok=True)
    return data


WIRE = _load_wire()


def _one_payload(name: str, datagrams: list[dict[str, Any]]) -> bytes:
    """The bytes of one sample: every transport got the same, and repr/hex/len agree."""
    payloads = set()
    for dgram in datagrams:
        payload = ast.literal_eval(dgram["repr"])
        assert isinstance(payload, bytes), name
        assert payload == bytes.fromhex(dgram["hex"]), name
        assert len(payload) == dgram["len"], name
        payloads.add(payload)
    assert len(payloads) == 1, f"{name}: transports disagree"
    return payloads.pop()


def _all_captures() -> list[Capture]:
    """Every captured datagram (except the size-limit ones, which carry only head/tail)."""
    if WIRE is None:
        return []
    captures = []
    for key, sample in WIRE["script_samples"].items():
        if sample["datagrams"]:
            name = f"script {key}: {sample['what']}"
            captures.append(Capture(name, _one_payload(name, sample["datagrams"])))
    for sample in WIRE["mi_raise"]:
        if sample["datagrams"]:
            name = f"mi_raise: {sample['what']}"
            captures.append(Capture(name, _one_payload(name, sample["datagrams"])))
    return captures


ALL_CAPTURES = _all_captures()
