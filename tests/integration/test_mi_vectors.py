"""Replay every MI request captured from a real OpenSIPS against engine.mi.handle.

Each engine is set up like the captured session (same events in the same id
order, the same static subscription). Replies are compared byte for byte,
except ttl numbers (they depend on elapsed time: compared structurally,
1 <= ttl <= expire), ``uptime``'s clock strings, and the cases where the
capture shows an OpenSIPS quirk we deliberately fix (docs/mi.md, "Deliberate
differences"): there the test asserts our documented behaviour instead.
Where the capture waited (expiry), the replay waits too.
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

from engine.mi.commands import SERVER
from engine.mi.dispatch import handle
from tests.helpers.mi import (
    MI_EVENTS,
    NAMES_EVENTS,
    OK,
    ONE_WORKER,
    STATIC,
    check_ttls,
    mi,
    no_ttl,
    replay_mi_json,
    vectors,
)
from tests.helpers.support import running_engine, udp_receiver, unix_receiver

UNAVAILABLE = '{"jsonrpc":"2.0","error":{"code":480,"message":"Temporarily Unavailable"},"id":"1"}'


def test_mi_json_replayed_byte_for_byte() -> None:
    with running_engine(MI_EVENTS, static=[("E_STARTUP_SUB", STATIC)], **ONE_WORKER) as engine:
        replay_mi_json(lambda data: handle(engine, data))


def test_mi_names_replayed() -> None:
    """OpenSIPS 4.x names, `which`, `version`, `uptime` (mi_names.json)."""
    with running_engine(NAMES_EVENTS, static=[("E_PIKE_BLOCKED", STATIC)], **ONE_WORKER) as engine:
        for case in vectors("mi_names.json"):
            request = json.loads(case["request"])
            got = mi(engine, case["request"])
            assert got is not None
            if request["method"] == "which" and "params" not in request:
                # Only the commands we have; OpenSIPS lists every module's.
                names = json.loads(got)["result"]
                assert names == [
                    "core:uptime",
                    "core:version",
                    "core:which",
                    "evi:subscribe",
                    "evi:list",
                    "evi:subscribers",
                    "evi:raise",
                ]
                assert set(names) <= set(json.loads(case["reply"])["result"])
            elif request["method"] in ("version", "core:version"):
                assert (
                    got
                    == b'{"jsonrpc":"2.0","result":{"Server":"' + SERVER.encode() + b'"},"id":"1"}'
                )
                assert re.fullmatch(r"event-datagram \([0-9][^ ]* \([^/ ]+/[a-z0-9]+\)\)", SERVER)
            elif request["method"] == "uptime":
                shape = (
                    r'\{"jsonrpc":"2\.0","result":\{"Now":"(?P<now>[A-Z][a-z]{2} [A-Z][a-z]{2} '
                    r'[ 123]\d \d\d:\d\d:\d\d \d{4})","Up since":"(?P<since>[^"]+)",'
                    r'"Up time":"(?P<up>\d+) \[sec\]"\},"id":"1"\}'
                )
                assert re.fullmatch(shape, case["reply"])  # the pattern fits OpenSIPS's reply
                m = re.fullmatch(shape, got.decode())
                assert m, got
                assert m["since"] == time.ctime(engine.started_at)
                assert int(m["up"]) == int(time.time() - engine.started_at) or int(m["up"]) >= 0
            else:
                assert no_ttl(got) == no_ttl(case["reply"]), case["request"]


def test_expire0_replayed() -> None:
    """expire 0 unsubscribes at once: nothing more is delivered, even in the same second."""
    ours = {
        "MI raise same second": UNAVAILABLE,
        "subscribers_list same second": '{"jsonrpc":"2.0","result":{"Event":{}},"id":"1"}',
        "MI raise next second": UNAVAILABLE,
    }
    with running_engine(MI_EVENTS, **ONE_WORKER) as engine:
        for case in vectors("expire0.json"):
            request = {"jsonrpc": "2.0", "id": "1", **json.loads(case["request"])}
            got = mi(engine, request)
            assert got == ours.get(case["label"], case["reply"]).encode(), case["label"]
        assert engine.statistics().events_raised["E_SAMPLE"] == 2
        assert engine.drops["no_subscribers"] == 2


# Our datagrams where OpenSIPS's show a quirk (docs/mi.md: deliberate differences).
_HEAD = b'{"jsonrpc":"2.0","method":"E_SAMPLE","params":'
OUR_DATAGRAMS = {
    "positional: array params (strings)": _HEAD + b'["a","b"]}',
    "named: array params mixed types": _HEAD + b'["a",1,2.5,true,null]}',
    "named: array params with int only": _HEAD + b"[7]}",
    "named: JSON types string": _HEAD
    + b'{"i":7,"neg":-5,"f":3.7,"big":9999999999,"t":true,"n":null,"o":{"a":1},'
    + b'"arr":[1,"x"],"s":"str"}}',
}


def test_mi_raise_replayed_with_datagrams(tmp_path: Path) -> None:
    """wire.json's MI raise_event series: replies and the datagram bytes, UDP and UNIX."""
    udp, unix = udp_receiver(), unix_receiver(tmp_path)
    try:
        with running_engine(MI_EVENTS, **ONE_WORKER) as engine:
            for rx in (udp, unix):
                assert mi(engine, _subscribe(rx.socket_text)) == OK.encode()
            expected_count = 0
            for case in vectors("wire.json")["mi_raise"]:
                what = case["what"]
                got = mi(engine, case["mi"]["request"])
                want = case["mi"]["reply"]
                if what in OUR_DATAGRAMS:
                    want, datagram = OK, OUR_DATAGRAMS[what]
                else:
                    sent = [d for d in case["datagrams"] if d["transport"] == "udp"]
                    datagram = ast.literal_eval(sent[0]["repr"]) if sent else None
                assert got == want.encode(), what
                if datagram is None:
                    continue
                expected_count += 1
                for rx in (udp, unix):
                    received = rx.wait_for(expected_count)
                    assert received[-1] == datagram, (what, rx.socket_text)
            assert len(udp.quiet(0.1)) == len(unix.quiet(0.1)) == expected_count
    finally:
        udp.close()
        unix.close()


def _subscribe(socket: str, event: str = "E_SAMPLE", expire: int = 600) -> str:
    request = {"jsonrpc": "2.0", "id": "1", "method": "event_subscribe"}
    return json.dumps({**request, "params": [event, socket, expire]})


def test_fanout_listing_like_extra_json() -> None:
    """extra.json: five subscribers listed newest first, hostname kept separate."""
    capture = vectors("extra.json")["fanout_order"]
    with running_engine(MI_EVENTS, **ONE_WORKER) as engine:
        for sock in [*capture["subscribe_order"], "udp:127.0.0.1:9305"]:
            assert mi(engine, _subscribe(sock, expire=60)) == OK.encode()
        got = mi(
            engine, '{"jsonrpc":"2.0","id":"1","method":"subscribers_list","params":["E_SAMPLE"]}'
        )
        assert no_ttl(got) == no_ttl(capture["subscribers_list"])
        check_ttls(got)
