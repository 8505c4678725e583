"""No self-feeding (issue 17, item 5) and UNIX destinations resolved (item 6): a
real `Runner` (engine, ingest sockets, MI listeners) in this process, refusing
every spelling of a subscription that points back at one of its own sockets, from
the MI, the config and the state file; symbolic links judged and sent to by their
real path."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine import config
from engine.cli.run import Runner
from engine.errors import ConfigError
from engine.producer import Engine
from engine.subscriptions import AllowList, Registry
from tests.helpers.mi import mi
from tests.helpers.support import running_engine, settle, unique_instance, unix_receiver

pytestmark = pytest.mark.slow


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


def toml(tmp_path: Path, *, ingest: list[str], extra: str = "", http: str = "127.0.0.1:0") -> str:
    return (
        'events = ["E_SAMPLE"]\n'
        "[engine]\n"
        f'instance = "{unique_instance("self")}"\n'
        "workers = 1\n"
        "pin = false\n"
        f'runtime_dir = "{tmp_path / "run"}"\n'
        "[mi]\n"
        f'http = "{http}"\n'
        'datagram = "127.0.0.1:0"\n'
        f'fifo = "{tmp_path / "mi.fifo"}"\n'
        "[state]\n"
        f'file = "{tmp_path / "state.json"}"\n'
        "[ingest]\n"
        f"listen = {json.dumps(ingest)}\n" + extra
    )


@contextmanager
def running(text: str) -> Iterator[Runner]:
    runner = Runner(config.loads(text))
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def subscribe(engine: Engine, socket_text: str) -> dict[str, Any]:
    reply = mi(engine, {"jsonrpc": "2.0", "method": "event_subscribe",
                        "params": ["E_SAMPLE", socket_text], "id": 1})  # fmt: skip
    assert reply is not None
    result: dict[str, Any] = json.loads(reply)
    return result


def refused(engine: Engine, socket_text: str, why: str = "this engine's own") -> None:
    reply = subscribe(engine, socket_text)
    assert "error" in reply, f"{socket_text} was accepted: {reply}"
    error = reply["error"]
    assert (error["code"], error["message"]) == (400, "Bad parameter value"), reply
    assert why in error.get("data", ""), reply


def listed(engine: Engine) -> list[str]:
    with engine.lock:
        return [s.dest.key for s in engine.registry.subscribers("E_SAMPLE")]


def host_address() -> str | None:
    """A non-loopback IPv4 address of this host, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    return None


def test_every_spelling_of_an_own_socket_is_refused_over_the_mi(tmp_path: Path) -> None:
    sock_path = tmp_path / "ingest.sock"
    text = toml(tmp_path, ingest=["udp:127.0.0.1:0", f"unix:{sock_path}"])
    with running(text) as runner:
        engine = runner.engine
        assert runner.ingest is not None and runner.http and runner.datagram
        port = runner.ingest.sockets[0].sock.getsockname()[1]
        (tmp_path / "link.sock").symlink_to(sock_path)
        (tmp_path / "sub").mkdir()
        spellings = [
            f"udp:127.0.0.1:{port}",
            f"udp:localhost:{port}",
            f"udp:0.0.0.0:{port}",  # Linux delivers it to 127.0.0.1
            f"udp:[::ffff:127.0.0.1]:{port}",
            f"udp:127.0.0.1:0{port}",
            f"udp:127.0.0.1:{runner.datagram.address[1]}",  # the MI datagram socket
            f"udp:127.0.0.1:{runner.http.address[1]}",  # the HTTP listener
            f"unix:{sock_path}",
            f"{tmp_path}/sub/../ingest.sock",
            f"unix:{tmp_path / 'link.sock'}",  # a symbolic link to the ingest socket
            f"unix:{tmp_path / 'mi.fifo'}",
        ]
        for text_ in spellings:
            refused(engine, text_)
        refused_n = engine.guards.snapshot()[0]["subscribe"]
        assert refused_n == len(spellings)
        assert listed(engine) == []
        # Not one of ours: accepted (another port, another loopback address).
        other = free_udp_port()
        assert subscribe(engine, f"udp:127.0.0.1:{other}")["result"] == "OK"
        assert subscribe(engine, f"udp:127.0.0.2:{port}")["result"] == "OK"
        # The refusal names the listener and what the spelling resolved to.
        reply = subscribe(engine, f"udp:localhost:{port}")
        assert (
            f"(= 127.0.0.1) is this engine's own ingest socket 127.0.0.1:{port}"
            in (reply["error"]["data"])
        )


def test_a_wildcard_bind_matches_every_local_address(tmp_path: Path) -> None:
    text = toml(tmp_path, ingest=["udp:0.0.0.0:0", "udp:[::]:0"])
    with running(text) as runner:
        engine = runner.engine
        assert runner.ingest is not None
        v4 = runner.ingest.sockets[0].sock.getsockname()[1]
        v6 = runner.ingest.sockets[1].sock.getsockname()[1]
        for text_ in (f"udp:127.0.0.1:{v4}", f"udp:127.0.0.9:{v4}", f"udp:localhost:{v4}"):
            refused(engine, text_)
        # `::` takes IPv6 and (dual stack) IPv4.
        for text_ in (f"udp:[::1]:{v6}", f"udp:127.0.0.1:{v6}", f"udp:[::ffff:127.0.0.1]:{v6}"):
            refused(engine, text_)
        local = host_address()
        if local is not None:  # the allow-list says no too; the loop is named first
            allow = AllowList.parse([f"{local}/32"])
            with engine.lock:
                engine.registry._allow = allow  # this one address only
            refused(engine, f"udp:{local}:{v4}")
        # An IPv4 wildcard takes no IPv6: [::1] at its port is not ours.
        with engine.lock:
            engine.registry._allow = AllowList.default()
        assert subscribe(engine, f"udp:[::1]:{v4}")["result"] == "OK"


def test_static_subscription_and_upstream_pointing_at_the_engine_are_config_errors(
    tmp_path: Path,
) -> None:
    port, mi_port, http_port = free_udp_port(), free_udp_port(), free_udp_port()
    base = toml(tmp_path, ingest=[f"udp:127.0.0.1:{port}"], http=f"127.0.0.1:{http_port}")
    base = base.replace('datagram = "127.0.0.1:0"', f'datagram = "127.0.0.1:{mi_port}"')
    static = base + f'[[subscription]]\nevent = "E_SAMPLE"\nsocket = "udp:localhost:{port}"\n'
    with pytest.raises(ConfigError, match=r"own ingest socket .* at `\$\.subscription\[0\]`"):
        Runner(config.loads(static)).start()
    for target, what in (
        (f"udp:127.0.0.1:{mi_port}", "MI datagram"),
        (f"http://localhost:{http_port}/mi", "HTTP MI"),
        (f"http://[::ffff:127.0.0.1]:{http_port}/mi", "HTTP MI"),
        (f"fifo:{tmp_path / 'mi.fifo'}", "MI FIFO"),
    ):
        text = base + f'[[upstream]]\nmi = "{target}"\nevents = ["E_SAMPLE"]\n'
        with pytest.raises(ConfigError, match=rf"upstream MI .* own {what} .*upstream\[0\]\.mi"):
            Runner(config.loads(text)).start()


def test_a_saved_loop_is_dropped_at_load_and_from_the_file(tmp_path: Path) -> None:
    port, rx_port = free_udp_port(), free_udp_port()
    state = tmp_path / "state.json"
    saver = Registry(state_file=state)  # what an engine without the guard saved
    saver.register_event("E_SAMPLE")
    saver.subscribe("E_SAMPLE", f"udp:127.0.0.1:{port}")  # the loop
    saver.subscribe("E_SAMPLE", f"udp:127.0.0.1:{rx_port}")  # a legitimate one
    saver.save()
    with running(toml(tmp_path, ingest=[f"udp:127.0.0.1:{port}"])) as runner:
        assert listed(runner.engine) == [f"udp:127.0.0.1:{rx_port}"]
        assert runner.engine.guards.snapshot()[0]["state"] == 1
    saved = state.read_text()
    assert f":{rx_port}" in saved and f':{port}"' not in saved


def test_a_listener_opened_later_drops_the_subscriptions_that_point_at_it() -> None:
    port = free_udp_port()
    with running_engine(["E_SAMPLE"], pin=False, workers=1) as engine:
        engine.subscribe("E_SAMPLE", f"udp:localhost:{port}")
        engine.subscribe("E_SAMPLE", f"udp:127.0.0.1:{port + 1 if port < 65535 else 1}")
        assert engine.own_socket("ingest socket", ("0.0.0.0", port)) == 1
        assert len(listed(engine)) == 1 and f":{port}" not in listed(engine)[0]
        assert engine.guards.snapshot()[0]["listener"] == 1


def test_a_symbolic_link_cannot_bypass_the_allow_list(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "evil.sock").symlink_to(outside / "x.sock")
    (allowed / "dangling.sock").symlink_to(allowed / "nothing-here.sock")
    target = unix_receiver(outside, "x.sock")  # a live socket outside the allow-list
    allow = AllowList.parse([str(allowed)])
    try:
        with running_engine(["E_SAMPLE"], allow=allow, pin=False, workers=1) as engine:
            why = f"(= {outside / 'x.sock'}) is not in the allow-list"
            refused(engine, f"unix:{allowed / 'evil.sock'}", why)
            refused(engine, f"unix:{allowed / 'dangling.sock'}", "dangling symbolic link")
            assert listed(engine) == []
    finally:
        target.close()


def test_the_engine_sends_to_the_path_the_allow_list_checked(tmp_path: Path) -> None:
    first, second = unix_receiver(tmp_path, "first.sock"), unix_receiver(tmp_path, "second.sock")
    link = tmp_path / "link.sock"
    link.symlink_to(tmp_path / "first.sock")
    try:
        with running_engine(["E_SAMPLE"], pin=False, workers=1) as engine:
            assert subscribe(engine, f"unix:{link}")["result"] == "OK"
            assert listed(engine) == [f"unix:{link}"]  # listed as written
            os.unlink(link)  # re-pointed after the check: not followed
            link.symlink_to(tmp_path / "second.sock")
            engine.raise_event("E_SAMPLE", {"n": 1})
            settle(engine)
            assert len(first.wait_for(1)) == 1
            assert second.quiet() == []
    finally:
        first.close()
        second.close()
