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
from tests.mi_support import EVENTS_REPLY, ONE_WORKER
from tests.mi_support import EVENTS_REQUEST as REQUEST

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
