"""engine/mi_fifo.py: the MI over a real named pipe, OpenSIPS mi_fifo framing."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.mi.client import call
from engine.mi.fifo import FifoServer
from engine.producer import Engine
from tests.helpers.mi import EVENTS_REPLY, ONE_WORKER
from tests.helpers.mi import EVENTS_REQUEST as REQUEST

# The module's shared `engine` (conftest.py): the transport tests' probe, EVENTS_REPLY.
ENGINE = {"events": ["E_SAMPLE", "E_BENCH"], **ONE_WORKER}


@pytest.fixture
def fifo(engine: Engine, tmp_path: Path) -> Iterator[FifoServer]:
    server = FifoServer(
        engine, str(tmp_path / "mi.fifo"), str(tmp_path), max_request=4096, idle_timeout=0.3
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ReplyFifo:
    """A client's reply FIFO, read the way opensips-cli does (blocking open, read to EOF)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        os.mkfifo(self.path)
        self.data: bytes | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as f:  # blocks until the server opens it
            self.data = f.read()

    def result(self, timeout: float = 5.0) -> bytes | None:
        self._thread.join(timeout)
        if self._thread.is_alive():  # no reply came: unblock the reader
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            self._thread.join(2)
            return None
        return self.data


def write(server: FifoServer, data: bytes) -> None:
    with open(server.path, "wb") as f:
        f.write(data)


def test_opensips_cli_style_request(fifo: FifoServer, tmp_path: Path) -> None:
    reply = ReplyFifo(tmp_path, "opensips_fifo_reply_123")
    write(fifo, b":opensips_fifo_reply_123:" + REQUEST)  # no newline, like opensips-cli
    assert reply.result() == EVENTS_REPLY


def test_several_requests_in_one_write(fifo: FifoServer, tmp_path: Path) -> None:
    replies = [ReplyFifo(tmp_path, f"r{i}") for i in range(3)]
    data = b":r0:" + REQUEST + b"\n:r1:\n" + REQUEST + b" :r2:" + REQUEST.replace(b'"1"', b"3")
    write(fifo, data)
    assert replies[0].result() == EVENTS_REPLY
    assert replies[1].result() == EVENTS_REPLY
    assert replies[2].result() == EVENTS_REPLY.replace(b'"1"}', b"3}")


def test_request_split_across_writes(fifo: FifoServer, tmp_path: Path) -> None:
    reply = ReplyFifo(tmp_path, "split")
    with open(fifo.path, "wb", buffering=0) as f:
        for piece in (b":spl", b"it:", REQUEST[:10], REQUEST[10:30], REQUEST[30:]):
            f.write(piece)
            time.sleep(0.02)
    assert reply.result() == EVENTS_REPLY


def test_no_reply_fifo_still_runs(fifo: FifoServer, engine: Engine, tmp_path: Path) -> None:
    sub = b'{"jsonrpc":"2.0","id":1,"method":"event_subscribe",' + (
        b'"params":["E_BENCH","udp:127.0.0.1:9201"]}'
    )
    write(fifo, b"::" + sub + b"\n")
    deadline = time.monotonic() + 5
    while True:
        with engine.lock:
            if engine.registry.find("E_BENCH", "udp:127.0.0.1:9201"):
                break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    engine.unsubscribe("E_BENCH", "udp:127.0.0.1:9201")


@pytest.mark.parametrize("name", ["../escape", "a/b", "x.y", "..", "a\\b", "n" * 256])
def test_reply_fifo_must_be_a_plain_name(fifo: FifoServer, tmp_path: Path, name: str) -> None:
    outside = tmp_path.parent / "escape"
    write(fifo, b":" + name.encode() + b":" + REQUEST + b"\n")
    reply = ReplyFifo(tmp_path, "after")
    write(fifo, b":after:" + REQUEST)
    assert reply.result() == EVENTS_REPLY  # the bad one was ignored, the next one served
    assert not outside.exists()


def test_reply_path_must_be_a_fifo(fifo: FifoServer, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    os.mkfifo(tmp_path / "target")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    write(fifo, b":plain:" + REQUEST + b"\n:link:" + REQUEST + b"\n:missing:" + REQUEST + b"\n")
    reply = ReplyFifo(tmp_path, "after")
    write(fifo, b":after:" + REQUEST)
    assert reply.result() == EVENTS_REPLY
    assert (tmp_path / "plain").read_bytes() == b""


def test_garbage_oversize_and_incomplete(fifo: FifoServer, tmp_path: Path) -> None:
    big = ReplyFifo(tmp_path, "big")
    write(fifo, b"garbage line\n:big:[" + b"1," * 3000 + b"1]\n")  # complete, but too big
    error = json.loads(big.result() or b"{}")["error"]
    assert error["code"] == -32600 and "4096-byte FIFO limit" in error["data"]
    big2 = ReplyFifo(tmp_path, "big2")
    with open(fifo.path, "wb", buffering=0) as f:  # too big before it is even complete
        f.write(b":big2:[" + b"1," * 3000)
        time.sleep(0.1)
        f.write(b"1]\n")
    assert "4096-byte FIFO limit" in json.loads(big2.result() or b"{}")["error"]["data"]
    cut = ReplyFifo(tmp_path, "cut")
    write(fifo, b':cut:{"jsonrpc":"2.0","id":5,')  # never completed: answered after 0.3 s idle
    assert cut.result() == (
        b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
    )
    unbalanced = ReplyFifo(tmp_path, "unbalanced")
    nxt = ReplyFifo(tmp_path, "next")
    write(fifo, b':unbalanced:{"jsonrpc":"2.0",[[\n:next:' + REQUEST + b"\n")
    assert unbalanced.result() == (
        b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
    )
    assert nxt.result() == EVENTS_REPLY
    text = ReplyFifo(tmp_path, "text")
    write(fifo, b":text:not json\n")
    assert text.result() == (
        b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
    )
    after = ReplyFifo(tmp_path, "after")
    write(fifo, b":after:" + REQUEST)
    assert after.result() == EVENTS_REPLY


def test_client_over_fifo(fifo: FifoServer, tmp_path: Path) -> None:
    result = call(f"fifo:{fifo.path}", "events_list", reply_dir=str(tmp_path))
    assert result == {"Events": [{"name": "E_SAMPLE", "id": 0}, {"name": "E_BENCH", "id": 1}]}


def test_fifo_file_life_cycle(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "mi.fifo"
    path.write_text("not a fifo")
    with pytest.raises(OSError, match="not a FIFO"):
        FifoServer(engine, str(path))
    path.unlink()
    os.mkfifo(path)  # left over from an earlier run: replaced
    server = FifoServer(engine, str(path), str(tmp_path))
    server.start()
    assert path.is_fifo()
    server.stop()
    assert not path.exists()


def test_an_empty_request_is_a_parse_error_to_its_own_sender(
    fifo: FifoServer, tmp_path: Path
) -> None:
    first, second = ReplyFifo(tmp_path, "first"), ReplyFifo(tmp_path, "second")
    write(fifo, b":first:\n")  # nothing after the prefix...
    time.sleep(0.05)
    write(fifo, b":second:" + REQUEST + b"\n")  # ...and the next line is another client's
    got = json.loads(first.result() or b"null")
    assert got["error"]["code"] == -32700 and got["error"]["data"] == "empty request"
    assert second.result() == EVENTS_REPLY


def test_many_concurrent_clients_each_get_their_own_replies(
    fifo: FifoServer, tmp_path: Path
) -> None:
    clients, rounds = 16, 20
    errors: list[str] = []

    def client(c: int) -> None:
        for r in range(rounds):
            name = f"c{c}r{r}"
            reply = ReplyFifo(tmp_path, name)
            if r % 5 == 4:  # now and then an empty request
                write(fifo, f":{name}:\n".encode())
                want_error = True
            else:
                body = {"jsonrpc": "2.0", "method": "events_list", "id": name}
                write(fifo, f":{name}:{json.dumps(body)}\n".encode())
                want_error = False
            data = reply.result(timeout=10)
            os.unlink(reply.path)
            if data is None:
                errors.append(f"{name}: no reply")
                continue
            got = json.loads(data)
            if want_error:
                if got.get("error", {}).get("code") != -32700:
                    errors.append(f"{name}: {got}")
            elif got.get("id") != name or "result" not in got:
                errors.append(f"{name}: reply for {got.get('id')!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert fifo.replies_dropped == 0


def test_reply_fifos_nobody_opens_do_not_hold_up_other_clients(
    fifo: FifoServer, tmp_path: Path
) -> None:
    for i in range(10):  # each would cost ~0.3 s of retries to open
        os.mkfifo(tmp_path / f"deaf{i}")
        write(fifo, f":deaf{i}:".encode() + REQUEST + b"\n")
    reply = ReplyFifo(tmp_path, "patient")
    start = time.monotonic()
    write(fifo, b":patient:" + REQUEST + b"\n")
    assert reply.result() == EVENTS_REPLY
    took = time.monotonic() - start
    # Served in parallel: well before the 10 x 0.32 s the deaf ones cost in a row.
    assert took < 1.5, f"the reply took {took:.2f} s"
    deadline = time.monotonic() + 10
    while fifo.replies_dropped < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fifo.replies_dropped == 10
