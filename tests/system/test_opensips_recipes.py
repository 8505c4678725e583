"""The two OpenSIPS recipes of docs/opensips.md, run as written there.

The engine's config and command are taken from the page; so are the addresses
of the OpenSIPS side (the `mi_datagram` socket of recipe 1's opensips.cfg, the
exchange and routing key of recipe 2's `subscribe_event`). An engine stands in
for OpenSIPS's MI (it answers the same commands, byte for byte) and raises the
event; for recipe 2 the test publishes what event_rabbitmq would, to a private
RabbitMQ (the `rabbitmq` fixture).

"As written" within what a shared test machine allows: each engine gets an
instance name of its own (shared memory is machine-wide), its state under the
test's directory, and a fixed port of the page that is busy here is replaced,
everywhere it appears, by a free one.
"""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pika

from engine.testing.broker import LocalBroker
from tests.helpers.mi import EXE, Proc, client, processes
from tests.helpers.support import REPO, unique_instance

PAGE = REPO / "docs" / "opensips.md"
PIKE = b'{"jsonrpc":"2.0","method":"E_PIKE_BLOCKED","params":{"ip":"192.168.2.11"}}'


def section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 4)
    return text[start : end if end > 0 else len(text)]


def block(text: str, first_line: str) -> str:
    """The fenced block whose first line starts with `first_line`."""
    found = [b for b in re.findall(r"```\w*\n(.*?)```", text, re.S) if b.startswith(first_line)]
    assert len(found) == 1, f"one block starting {first_line!r} wanted, got {len(found)}"
    return found[0]


def commands(text: str) -> list[list[str]]:
    """The indented `event-datagram run ...` lines of a section, split into words."""
    return [line.split()[1:] for line in re.findall(r"^    (event-datagram run .*)$", text, re.M)]


def port_busy(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def substitutions(fixed: dict[str, int]) -> dict[str, str]:
    """`127.0.0.1:PORT` -> itself, or a free port's address when PORT is busy here."""
    out = {}
    for address, kind in fixed.items():
        port = int(address.rsplit(":", 1)[1])
        new = free_port(kind) if port_busy(port, kind) else port
        out[address] = f"127.0.0.1:{new}"
    return out


def apply(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        text = re.sub(rf"{re.escape(old)}(?!\d)", new, text)
    return text


def documented(words: list[str], tmp_path: Path, subs: dict[str, str]) -> list[str]:
    """A documented command's words, ports substituted, the config file the test's copy."""
    return [
        str(tmp_path / w) if w == "event-datagram.toml" else w
        for w in apply(" ".join(words), subs).split()
    ]


def engine_flags(tmp_path: Path, tag: str) -> list[str]:
    """What the test adds to a documented command: its own instance and state file,
    and the engine's own MI ports (as documented, or free ones when those are busy)."""
    flags = ["--instance", unique_instance(tag), "--state-file", str(tmp_path / f"{tag}.state")]
    if port_busy(8558, socket.SOCK_STREAM) or port_busy(8559, socket.SOCK_DGRAM):
        flags += ["--http", "127.0.0.1:0", "--mi-datagram", "127.0.0.1:0"]
    return flags


def ready(proc: Proc) -> str:
    return proc.wait_err(r"event-datagram ready: (.*)", 30)[1]


def http_mi(ready_line: str) -> str:
    m = re.search(r"mi (http://\S+/mi)", ready_line)
    assert m, ready_line
    return m[1]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def subscribed_at(mi: str, event: str) -> list[str]:
    done = client("subscribers", event, "--mi", mi, "--json")
    if done.returncode != 0:
        return []
    return re.findall(r'"socket":"([^"]+)"', done.stdout.decode())


def stand_in_opensips(tmp_path: Path, mi_socket: str) -> Proc:
    """An engine answering OpenSIPS's MI on `mi_socket` (udp:IP:PORT), state off."""
    cfg = tmp_path / "opensips-mi.toml"
    cfg.write_text(
        'events = ["E_PIKE_BLOCKED"]\n'
        f'[engine]\ninstance = "{unique_instance("osips")}"\nworkers = 1\npin = false\n'
        f'runtime_dir = "{tmp_path / "rt-opensips"}"\n'
        f'[mi]\nhttp = ""\ndatagram = "{mi_socket.removeprefix("udp:")}"\n'
        "[state]\nenabled = false\n"
    )
    proc = Proc([EXE, "run", "--config", str(cfg)])
    ready(proc)
    return proc


def test_recipe_1_datagram_ingest_and_upstream_as_written(tmp_path: Path) -> None:
    text = section("Recipe 1")
    cfg = block(text, "# opensips.cfg: recipe 1")
    toml = block(text, "# event-datagram.toml: recipe 1")
    mi = re.search(r'modparam\("mi_datagram", "socket_name", "(udp:[\d.]+:\d+)"\)', cfg)
    assert mi, cfg
    assert 'loadmodule "event_datagram.so"' in cfg and 'loadmodule "mi_datagram.so"' in cfg
    listen = re.search(r'listen = \["(udp:[\d.]+:\d+)"\]', toml)
    assert listen and f'mi = "{mi[1]}"' in toml
    run_with_file, run_with_flags = commands(text)
    assert run_with_file == ["run", "--config", "event-datagram.toml"]
    assert run_with_flags == ["run", "--ingest", listen[1], "--upstream", mi[1]]

    subs = substitutions(
        {mi[1].removeprefix("udp:"): socket.SOCK_DGRAM, listen[1][4:]: socket.SOCK_DGRAM}
    )
    opensips_mi, ingest = apply(mi[1], subs), apply(listen[1], subs)
    (tmp_path / "event-datagram.toml").write_text(apply(toml, subs))
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    with processes() as procs:
        opensips = stand_in_opensips(tmp_path, opensips_mi)
        procs.append(opensips)

        # The start that fails (the engine's MI on OpenSIPS's port, the old
        # default) subscribes nothing, so it reports no unsubscribing either. Its
        # upstream is then an MI address of its own: refused as a config error
        # (a self-feeding loop) before anything binds.
        args = [*documented(run_with_file, tmp_path, subs), *engine_flags(tmp_path, "clash")]
        clash = Proc([EXE, *args, "--mi-datagram", opensips_mi[4:]], env=env)
        procs.append(clash)
        assert clash.popen.wait(30) == 2
        clash.stop()
        assert f"upstream MI '{opensips_mi}' is this engine's own MI datagram" in clash.stderr
        assert "unsubscribed" not in clash.stderr and "subscribed" not in clash.stderr
        assert subscribed_at(opensips_mi, "E_PIKE_BLOCKED") == []

        # As written: the engine subscribes its ingest socket at "OpenSIPS".
        args = [*documented(run_with_file, tmp_path, subs), *engine_flags(tmp_path, "rec1")]
        engine = Proc([EXE, *args], env=env)
        procs.append(engine)
        engine_mi = http_mi(ready(engine))
        wait_for(
            lambda: subscribed_at(opensips_mi, "E_PIKE_BLOCKED") == [ingest],
            f"the engine subscribed {ingest} at {opensips_mi}",
        )
        listener = Proc([EXE, "listen", "udp:127.0.0.1:0", "E_PIKE_BLOCKED", "--mi", engine_mi])
        procs.append(listener)
        listener.wait_err(r"listening on udp:")
        # "OpenSIPS" raises the event: one datagram to the engine, relayed to the listener.
        raised = client("raise", "E_PIKE_BLOCKED", '{"ip":"192.168.2.11"}', "--mi", opensips_mi)
        assert raised.returncode == 0, raised.stderr
        assert listener.wait_out(1) == [PIKE + b"\n"]
        assert listener.stop(signal.SIGINT) == 0
        assert engine.stop(signal.SIGTERM) == 0, engine.stderr
        assert f"unsubscribed {ingest} from 1 event(s)" in engine.stderr
        assert subscribed_at(opensips_mi, "E_PIKE_BLOCKED") == []

        # The command-line form: every event of that OpenSIPS.
        args = [*documented(run_with_flags, tmp_path, subs), *engine_flags(tmp_path, "rec1b")]
        flags_only = Proc([EXE, *args], env=env)
        procs.append(flags_only)
        ready(flags_only)
        wait_for(
            lambda: subscribed_at(opensips_mi, "E_PIKE_BLOCKED") == [ingest],
            f"--upstream subscribed {ingest} at {opensips_mi}",
        )
        assert flags_only.stop(signal.SIGTERM) == 0, flags_only.stderr
        assert subscribed_at(opensips_mi, "E_PIKE_BLOCKED") == []

        # Without an upstream: "only `events` and `[ingest]`", and OpenSIPS subscribes
        # the engine (the page's opensips-cli line, sent by our client to the same MI).
        cli = re.search(r"^    opensips-cli -x mi (event_subscribe \S+ \S+ \d+)$", text, re.M)
        assert cli, "no opensips-cli event_subscribe line"
        _, event, sock, expire = apply(cli[1], subs).split()
        assert (event, sock) == ("E_PIKE_BLOCKED", ingest)
        (tmp_path / "event-datagram.toml").write_text(
            apply(toml[: toml.index("\n[[upstream]]")], subs)
        )
        args = [*documented(run_with_file, tmp_path, subs), *engine_flags(tmp_path, "rec1c")]
        plain = Proc([EXE, *args], env=env)
        procs.append(plain)
        plain_mi = http_mi(ready(plain))
        assert f"ingest {ingest}," in plain.stderr
        done = client("subscribe", event, sock, expire, "--mi", opensips_mi)
        assert done.returncode == 0, done.stderr
        listener = Proc([EXE, "listen", "udp:127.0.0.1:0", event, "--mi", plain_mi])
        procs.append(listener)
        listener.wait_err(r"listening on udp:")
        raised = client("raise", event, '{"ip":"192.168.2.11"}', "--mi", opensips_mi)
        assert raised.returncode == 0, raised.stderr
        assert listener.wait_out(1) == [PIKE + b"\n"]
        assert listener.stop(signal.SIGINT) == 0
        assert plain.stop(signal.SIGTERM) == 0, plain.stderr
        assert "upstream" not in plain.stderr
        assert opensips.stop() == 0


def test_recipe_2_rabbitmq_as_written(tmp_path: Path, rabbitmq: LocalBroker) -> None:
    text = section("Recipe 2")
    cfg = block(text, "# opensips.cfg: recipe 2")
    toml = block(text, "# event-datagram.toml: recipe 2")
    assert 'loadmodule "event_rabbitmq.so"' in cfg
    target = re.search(
        r'subscribe_event\("(E_\w+)", "rabbitmq:(\w+):(\w+)@([\d.]+:\d+)/exchange=(\w+)\?(\w+)"\)',
        cfg,
    )
    assert target, cfg
    event, user, password, broker, exchange, routing_key = target.groups()
    url = re.search(r'url = "amqp://(\w+):(\w+)@([\d.]+:\d+)/%2F"', toml)
    assert url and url.groups() == (user, password, broker)
    assert f'exchange = "{exchange}"' in toml and event == "E_PIKE_BLOCKED"
    (run_args,) = commands(text)
    assert run_args == ["run", "--config", "event-datagram.toml"]

    # The broker of the page is the test's private one.
    (tmp_path / "event-datagram.toml").write_text(
        toml.replace(f"@{broker}/", f"@127.0.0.1:{rabbitmq.port}/")
    )
    with processes() as procs:
        engine = Proc(
            [EXE, *documented(run_args, tmp_path, {}), *engine_flags(tmp_path, "rec2")],
            env={"XDG_RUNTIME_DIR": str(tmp_path)},
        )
        procs.append(engine)
        engine_mi = http_mi(ready(engine))
        metrics = engine_mi.removesuffix("/mi") + "/metrics"

        def consuming() -> bool:
            with urllib.request.urlopen(metrics, timeout=5) as reply:
                return bool(
                    re.search(rb"^event_datagram_amqp_up\{[^}]*\} 1\.0$", reply.read(), re.M)
                )

        wait_for(consuming, "the [[amqp]] source to consume", timeout=30)
        listener = Proc([EXE, "listen", "udp:127.0.0.1:0", event, "--mi", engine_mi])
        procs.append(listener)
        listener.wait_err(r"listening on udp:")
        # What event_rabbitmq publishes: the notification, to the exchange, with its key.
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
        try:
            connection.channel().basic_publish(exchange, routing_key, PIKE)
        finally:
            connection.close()
        assert listener.wait_out(1, timeout=20) == [PIKE + b"\n"]
        assert listener.stop(signal.SIGINT) == 0
        assert engine.stop(signal.SIGTERM) == 0, engine.stderr
