"""Every MI transport of a real `event-datagram run` process, over real sockets
and FIFOs: the captured vectors replayed, then a fuzz of thousands of random
and mutated requests per transport, after which the process must still answer
correctly and deliver every event raised."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from engine.mi.client import call
from tests.helpers.mi import (
    MI_EVENTS,
    NAMES_EVENTS,
    STATIC,
    RunProc,
    check_ttls,
    no_ttl,
    processes,
    replay_mi_json,
    vectors,
)
from tests.helpers.support import udp_receiver, unique_instance, unix_receiver


def write_config(tmp_path: Path, events: list[str], static: tuple[str, str]) -> Path:
    path = tmp_path / "edg.toml"
    path.write_text(
        f"events = {json.dumps(events)}\n"
        "[engine]\n"
        f'instance = "{unique_instance("srv")}"\n'
        "workers = 1\n"
        "pin = false\n"
        "[mi]\n"
        'http = "127.0.0.1:0"\n'
        'datagram = "127.0.0.1:0"\n'
        f'fifo = "{tmp_path / "mi.fifo"}"\n'
        f'fifo_reply_dir = "{tmp_path}"\n'
        "[state]\n"
        "enabled = false\n"
        "[[subscription]]\n"
        f'event = "{static[0]}"\n'
        f'socket = "{static[1]}"\n'
    )
    return path


@pytest.fixture
def run_mi(tmp_path: Path) -> Iterator[Callable[..., RunProc]]:
    with processes() as procs:

        def start(events: list[str], static: tuple[str, str]) -> RunProc:
            proc = RunProc("--config", str(write_config(tmp_path, events, static)))
            procs.append(proc)
            return proc

        yield start
        for proc in procs:
            assert proc.stop() == 0, proc.stderr
            assert "Traceback" not in proc.stderr, proc.stderr


def udp_sender(url: str | None) -> Callable[[bytes], bytes | None]:
    assert url is not None
    host, _, port = url[4:].rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(data: bytes) -> bytes | None:
        sock.sendto(data, (host, int(port)))
        sock.settimeout(5.0 if b'"id"' in data else 0.3)
        try:
            return sock.recv(70000)
        except TimeoutError:
            return None

    return send


def http_post(url: str | None, body: bytes) -> tuple[int, str, bytes]:
    assert url is not None
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def fifo_request(fifo: str | None, reply_dir: Path, line: bytes, name: str) -> bytes:
    """Like opensips-cli: make the reply FIFO, write the request, read the reply to EOF."""
    assert fifo is not None
    reply_path = reply_dir / name
    os.mkfifo(reply_path)
    try:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(reply_path.read_bytes()))
        reader.start()
        with open(fifo, "wb") as f:
            f.write(line)
        reader.join(10)
        assert result, "no reply on the reply FIFO"
        return result[0]
    finally:
        reply_path.unlink()


def test_mi_json_over_the_datagram_transport(run_mi: Callable[..., RunProc]) -> None:
    """mi.json was captured over mi_datagram: replayed over our UDP MI, in order."""
    proc = run_mi(MI_EVENTS, ("E_STARTUP_SUB", STATIC))
    replay_mi_json(udp_sender(proc.udp))


def test_vectors_over_http_and_fifo(run_mi: Callable[..., RunProc], tmp_path: Path) -> None:
    proc = run_mi(NAMES_EVENTS, ("E_PIKE_BLOCKED", STATIC))
    # mi_names.json over HTTP (how opensips-cli discovers commands).
    for case in vectors("mi_names.json"):
        request = json.loads(case["request"])
        if request["method"] not in ("evi:list", "evi:subscribers") or "params" in request:
            continue
        status, content_type, body = http_post(proc.http, case["request"].encode())
        assert (status, content_type) == (200, "application/json")
        assert body == case["reply"].encode()
    # extra.json: the same session's subscriptions, then its HTTP and FIFO requests.
    extra = vectors("extra.json")
    send = udp_sender(proc.udp)
    for sock in extra["fanout_order"]["subscribe_order"]:
        request = {"jsonrpc": "2.0", "id": "1", "method": "event_subscribe"}
        reply = send(json.dumps({**request, "params": ["E_SAMPLE", sock, 60]}).encode())
        assert reply == b'{"jsonrpc":"2.0","result":"OK","id":"1"}'
    for key in ("mi_http_event_subscribe", "mi_http_subscribers_list"):
        case = extra[key]
        status, content_type, body = http_post(proc.http, case["request"].encode())
        assert status == case["status"] == 200 and content_type == "application/json"
        assert no_ttl(body) == no_ttl(case["reply"])
    listing = b'{"jsonrpc":"2.0","id":"1","method":"subscribers_list","params":["E_SAMPLE"]}'
    got = http_post(proc.http, listing)[2]
    assert no_ttl(got) == no_ttl(extra["fanout_order"]["subscribers_list"])
    # The capture then unsubscribed the first four with expire 0: ours leave at once.
    for sock in extra["fanout_order"]["subscribe_order"]:
        call(f"fifo:{proc.fifo}", "event_subscribe", ["E_SAMPLE", sock, 0], reply_dir=str(tmp_path))
    case = extra["mi_fifo_subscribers_list"]
    name = case["request"].split(":")[1]
    reply = fifo_request(proc.fifo, tmp_path, case["request"].encode(), name)
    assert no_ttl(reply) == no_ttl(
        '{"jsonrpc":"2.0","result":{"Event":{"name":"E_SAMPLE","id":9,"Subscribers":'
        '[{"socket":"udp:127.0.0.1:9305","expire":60,"ttl":60}]}},"id":"3"}'
    )
    check_ttls(reply)
    # opensips-cli's FIFO framing: no trailing newline.
    line = b':cli_reply:{"jsonrpc": "2.0", "id": "7", "method": "which", "params": []}'
    assert json.loads(fifo_request(proc.fifo, tmp_path, line, "cli_reply"))["id"] == "7"


# -- fuzz --------------------------------------------------------------------------------------

_PALETTE = b'{}[]":,\\ \n\r\t\x00\xff\xc3-+.eE0123456789aznulltrue'
_NASTY = [
    b"1" * 400,
    b"-" + b"9" * 30,
    b"1e999",
    b"[" * 3000,
    b"{" * 3000,
    b'"\\ud800"',
    b'"' + b"x" * 3000 + b'"',
    b"null",
    b"true",
    b'{"a":' * 50,
    b'"\\u0000"',
]


def corpus() -> list[bytes]:
    requests = [c["request"].encode() for c in vectors("mi.json")]
    requests += [c["request"].encode() for c in vectors("mi_names.json")]
    requests += [c["mi"]["request"].encode() for c in vectors("wire.json")["mi_raise"]]
    for case in vectors("expire0.json"):
        requests.append(
            json.dumps({"jsonrpc": "2.0", "id": 1, **json.loads(case["request"])}).encode()
        )
    return requests


def mutate(rng: random.Random, requests: list[bytes]) -> bytes:
    data = bytearray(rng.choice(requests))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            del data[at : at + rng.randint(1, 20)]
        elif op == 2:
            data[at:at] = bytes(rng.choice(_PALETTE) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del data[at:]
        elif op == 4:
            data[at:at] = data[rng.randrange(len(data) + 1) :][: rng.randint(1, 40)]
        elif op == 5:
            data[at : at + rng.randint(0, 10)] = rng.choice(_NASTY)
        elif op == 6:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
        else:
            data += rng.choice(requests)
    return bytes(data)


def test_fuzz_every_transport_then_events_still_flow(
    run_mi: Callable[..., RunProc], tmp_path: Path
) -> None:
    proc = run_mi(["E_FUZZ", "E_SAMPLE", "E_BENCH"], ("E_BENCH", STATIC))
    rng = random.Random(20261126)
    requests = corpus()
    count = 3000
    # HTTP: one keep-alive connection, reopened whenever the server closes it.
    assert proc.http is not None
    parts = urlsplit(proc.http)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    answered = 0
    for _ in range(count):
        try:
            conn.request("POST", "/mi", mutate(rng, requests))
            response = conn.getresponse()
            body = response.read()
            assert response.status in (200, 204, 413), response.status
            if body:
                assert json.loads(body)["jsonrpc"] == "2.0"
                answered += 1
        except (http.client.HTTPException, OSError):
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    conn.close()
    assert answered > count // 2
    for _ in range(100):  # some that are not even HTTP
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=5) as raw:
            raw.sendall(rng.randbytes(rng.randint(1, 200)) + b"\r\n\r\n")
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):
                pass
    # UDP datagrams, in bursts; replies are drained as they come.
    assert proc.udp is not None
    host, _, port = proc.udp[4:].rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.05)
        replies = 0
        for i in range(count):
            sock.sendto(mutate(rng, requests), (host, int(port)))
            if i % 50 == 49:
                try:
                    while sock.recv(70000):
                        replies += 1
                except TimeoutError:
                    pass
        assert replies > 0
    # FIFO: mostly "::" (no reply), some refused reply names, one per line.
    assert proc.fifo is not None
    with open(proc.fifo, "wb") as f:
        for _ in range(count):
            name = rng.choice([b"", b"", b"", b"../x", b"a.b", b"nobody-here"])
            f.write(b":" + name + b":" + mutate(rng, requests) + b"\n")
    time.sleep(1.5)  # let the FIFO answer anything left incomplete (1 s idle)

    # The process still answers correctly on every transport...
    events = {"Events": [{"name": "E_FUZZ", "id": 0}, {"name": "E_SAMPLE", "id": 1},
                         {"name": "E_BENCH", "id": 2}]}  # fmt: skip
    for target in (proc.http, proc.udp, f"fifo:{proc.fifo}"):
        assert (
            call(target, "events_list", reply_dir=str(tmp_path))["Events"][:3] == events["Events"]
        )
    # ... and every event raised after the fuzz reaches both receivers.
    udp_rx, unix_rx = udp_receiver(), unix_receiver(tmp_path)
    try:
        for rx in (udp_rx, unix_rx):
            assert call(proc.http, "event_subscribe", ["E_FUZZ", rx.socket_text, 120]) == "OK"
        for n in range(30):
            assert call(proc.udp, "raise_event", ["E_FUZZ", json.dumps({"n": n})]) == "OK"
            time.sleep(0.01)  # UNIX receivers queue only 10 datagrams
        want = [
            f'{{"jsonrpc":"2.0","method":"E_FUZZ","params":{{"n":{n}}}}}'.encode()
            for n in range(30)
        ]
        for rx in (udp_rx, unix_rx):
            rx.wait_for(30)
            assert [d for d in rx.quiet(0.2) if d.startswith(want[0][:38]) and b'"n":' in d] == want
    finally:
        udp_rx.close()
        unix_rx.close()
