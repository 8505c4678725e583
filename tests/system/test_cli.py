"""The `event-datagram` command as a user runs it: real processes, real sockets.

The story test follows the issue's "done when": run, listen on UDP and UNIX,
raise from the CLI, the exact datagram at both listeners, subscribers shows
both, stop and start, the subscriptions are still there, unsubscribe, nothing
more arrives."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil

from engine import config
from engine.shm.segment import list_segments
from tests.helpers.mi import EXE, Proc, RunProc, client, processes
from tests.helpers.support import unique_instance

STORY = b'{"jsonrpc":"2.0","method":"E_STORY","params":{"ip":"192.168.2.11","count":7}}'


def run_args(
    tmp_path: Path, instance: str, http: str = "127.0.0.1:0", udp: str = "127.0.0.1:0"
) -> list[str]:
    return [
        "--instance", instance, "--http", http, "--mi-datagram", udp,
        "--state-file", str(tmp_path / "state.json"), "--event", "E_STORY",
        "--event", "E_OTHER", "--workers", "1",
    ]  # fmt: skip


def subscribers(url: str, event: str = "E_STORY") -> dict[str, dict[str, object]]:
    done = client("subscribers", event, "--mi", url, "--json")
    assert done.returncode == 0, done.stderr
    event_obj = json.loads(done.stdout)["Event"]
    return {s["socket"]: s for s in event_obj.get("Subscribers", [])}


def test_the_whole_story(tmp_path: Path) -> None:
    instance = unique_instance("story")
    with processes() as procs:
        run = RunProc(*run_args(tmp_path, instance))
        procs.append(run)
        assert run.http and run.udp
        http_port = run.http.split(":")[2].split("/")[0]
        udp_port = run.udp.rsplit(":", 1)[1]

        # Two listeners, one on UDP (any free port), one on a UNIX socket.
        unix_path = tmp_path / "listener.sock"
        listeners = []
        for sock in ("udp:127.0.0.1:0", f"unix:{unix_path}"):
            proc = Proc([EXE, "listen", sock, "E_STORY", "--mi", run.http, "--expire", "30"])
            procs.append(proc)
            listeners.append(proc)
        udp_sock = listeners[0].wait_err(r"listening on (udp:127\.0\.0\.1:\d+) for E_STORY")[1]
        listeners[1].wait_err(r"listening on unix:")
        unix_sock = f"unix:{unix_path}"

        # Raise from the CLI: both print the exact datagram.
        done = client("raise", "E_STORY", '{"ip":"192.168.2.11","count":7}', "--mi", run.http)
        assert (done.returncode, done.stdout) == (0, b"OK\n"), done.stderr
        for proc in listeners:
            assert proc.wait_out(1) == [STORY + b"\n"]

        # `subscribers` shows both, human-readable and as JSON.
        subs = subscribers(run.http)
        assert set(subs) == {udp_sock, unix_sock}
        assert all(s["expire"] == 30 for s in subs.values())
        human = client("subscribers", "--mi", run.http).stdout.decode()
        assert "E_STORY (id 0)" in human and udp_sock in human and unix_sock in human

        # Stop and start again (same ports, same state file): still subscribed.
        assert run.stop() == 0, run.stderr
        assert not list_segments(instance)
        run = RunProc(
            *run_args(tmp_path, instance, f"127.0.0.1:{http_port}", f"127.0.0.1:{udp_port}")
        )
        procs.append(run)
        assert run.http
        subs = subscribers(run.http)
        assert set(subs) == {udp_sock, unix_sock}
        assert all(0 < int(str(s["ttl"])) <= 30 for s in subs.values()), subs  # time left, kept

        # Events flow to the restored subscriptions (raised over the MI datagram this time).
        params = '{"ip":"192.168.2.11","count":7}'
        done = client("raise", "E_STORY", params, "--mi", f"udp:127.0.0.1:{udp_port}")
        assert done.returncode == 0, done.stderr
        for proc in listeners:
            assert proc.wait_out(2) == [STORY + b"\n"] * 2

        # Unsubscribe both: nothing more arrives, and raising says so.
        for sock in (udp_sock, unix_sock):
            done = client("unsubscribe", "E_STORY", sock, "--mi", run.http)
            assert (done.returncode, done.stdout) == (0, b"OK\n")
        assert subscribers(run.http) == {}
        done = client("raise", "E_STORY", '{"ip":"192.168.2.11","count":7}', "--mi", run.http)
        assert done.returncode == 1
        assert done.stderr.decode().strip() == (
            "event-datagram raise: no subscribers for E_STORY (error 480: Temporarily Unavailable)"
        )
        time.sleep(0.3)
        for proc in listeners:
            assert len(proc.out) == 2

        # The listeners stop cleanly; the UNIX one removes its socket file.
        for proc in listeners:
            assert proc.stop(signal.SIGINT) == 0, proc.stderr
        assert not unix_path.exists()
        assert run.stop() == 0, run.stderr
        assert not list_segments(instance)
        assert "Traceback" not in run.stderr


def test_client_verbs_and_their_errors(tmp_path: Path) -> None:
    with processes() as procs:
        run = RunProc(*run_args(tmp_path, unique_instance("verbs")))
        procs.append(run)
        assert run.http and run.udp
        for target in (run.http, run.udp):
            done = client("events", "--mi", target)
            assert done.stdout == b"   0  E_STORY\n   1  E_OTHER\n"
        env_done = client("events", "--json", env={"EVENT_DATAGRAM_MI": run.http})
        assert json.loads(env_done.stdout) == {
            "Events": [{"name": "E_STORY", "id": 0}, {"name": "E_OTHER", "id": 1}]
        }
        done = client("subscribe", "E_OTHER", "udp:127.0.0.1:9311", "120", "--mi", run.http)
        assert done.stdout == b"OK\n"
        done = client("subscribers", "E_OTHER", "udp:127.0.0.1:9311", "--mi", run.http)
        assert re.fullmatch(
            rb"E_OTHER  udp:127\.0\.0\.1:9311  expire 120  ttl 1[12]\d\n", done.stdout
        )
        assert client("subscribers", "E_STORY", "--mi", run.http).stdout == b"(no subscribers)\n"
        assert client("raise", "E_OTHER", '["a", 1]', "--mi", run.http).stdout == b"OK\n"
        failures = [
            (["subscribers", "E_NOPE"], 1, "error 404: Event not published"),
            (["subscribe", "E_OTHER", "tcp:1.2.3.4:5"], 1, "error 400: Bad parameter value"),
            (["subscribe", "E_OTHER", "udp:10.9.8.7:5"], 1, "Bad parameter value (destination"),
            (["raise", "E_NOPE"], 1, "error 404: Event not registered"),
            (["raise", "E_OTHER", "{bad"], 2, "JSON-PARAMS is not JSON"),
            (["raise", "E_OTHER", "5"], 2, "must be a JSON object or array"),
            (["subscribe", "E_OTHER"], 2, "the following arguments are required"),
        ]  # fmt: skip
        for args, code, text in failures:
            done = client(*args, "--mi", run.http)
            assert done.returncode == code and text in done.stderr.decode(), (args, done.stderr)
        assert run.stop() == 0
    done = client("events", "--mi", run.http, "--timeout", "2")
    assert done.returncode == 1 and "cannot reach the MI at" in done.stderr.decode()
    done = client("events", "--mi", "udp:127.0.0.1:9", "--timeout", "0.5")
    assert done.returncode == 1 and "MI" in done.stderr.decode()


def test_errors_say_what_is_wrong(tmp_path: Path) -> None:
    """Each refusal names its cause; sockets in our syntax are checked before sending."""
    with processes() as procs:
        run = RunProc(*run_args(tmp_path, unique_instance("errs")))
        procs.append(run)
        assert run.http and run.udp
        known = "known: E_STORY, E_OTHER"
        cases = [
            (["subscribe", "E_NOPE", "udp:127.0.0.1:9311"], 1,
             f"unknown event E_NOPE; {known} (error 400: Bad parameter value)"),
            (["subscribe", "E_OTHER", "udp:127.0.0.1:70000"], 2,
             "bad socket udp:127.0.0.1:70000: port must be 1-65535, got '70000'"),
            (["subscribe", "E_OTHER", "unix:rel/x.sock"], 2,
             "bad socket unix:rel/x.sock: unix socket path must be absolute, got 'rel/x.sock'"),
            (["subscribe", "E_OTHER", "rel/x.sock"], 2,
             "bad socket rel/x.sock: transport missing (expected udp:HOST:PORT, unix:/PATH"),
            # Another transport is sent (an OpenSIPS may take it); our 400 is explained.
            (["subscribe", "E_OTHER", "tcp:127.0.0.1:5"], 1,
             "bad socket tcp:127.0.0.1:5: unknown transport 'tcp' (only 'udp' and 'unix', "
             "lowercase) (error 400: Bad parameter value)"),
            (["raise", "E_OTHER"], 1,
             "no subscribers for E_OTHER (error 480: Temporarily Unavailable)"),
            (["raise", "E_NOPE"], 1,
             f"unknown event E_NOPE; {known} (error 404: Event not registered)"),
            (["subscribers", "E_NOPE"], 1,
             f"unknown event E_NOPE; {known} (error 404: Event not published)"),
            (["subscribers", "E_OTHER", "udp:127.0.0.1:9311"], 1,
             "udp:127.0.0.1:9311 is not subscribed to E_OTHER (error 404: Subscriber does not"),
            (["subscribe", "E_OTHER", "udp:127.0.0.1:9311", "5", "--expire", "6"], 2,
             "give EXPIRE or --expire, not both"),
        ]  # fmt: skip
        for target in (run.http, run.udp):
            for args, code, text in cases:
                done = client(*args, "--mi", target)
                err = done.stderr.decode()
                assert (done.returncode, f"event-datagram {args[0]}: {text}" in err) == (
                    code,
                    True,
                ), (args, err)
        # A listener refused for an unknown event says so too.
        bad = client("listen", "udp:127.0.0.1:0", "E_NOPE", "--mi", run.http)
        assert bad.returncode == 1
        assert f"unknown event E_NOPE; {known}" in bad.stderr.decode()

        # subscribe takes --expire as listen does.
        done = client(
            "subscribe", "E_OTHER", "udp:127.0.0.1:9312", "--expire", "77", "--mi", run.http
        )
        assert done.returncode == 0, done.stderr
        assert subscribers(run.http, "E_OTHER")["udp:127.0.0.1:9312"]["expire"] == 77
        assert run.stop() == 0


def test_usage_and_help_per_verb() -> None:
    """A verb's bad option prints that verb's usage; each --help has a line and an example."""
    done = client("subscribe", "E_X", "udp:127.0.0.1:5", "--exprie", "5")
    err = done.stderr.decode()
    assert done.returncode == 2
    assert err.startswith("usage: event-datagram subscribe "), err
    assert "unrecognized arguments: --exprie 5" in err
    done = client("events", "--bogus")
    assert done.returncode == 2 and done.stderr.decode().startswith("usage: event-datagram events ")
    verbs = ("run", "subscribe", "unsubscribe", "events", "subscribers", "raise", "listen", "bench")
    top = client("--help").stdout.decode()
    assert "event-datagram COMMAND --help" in top and all(
        re.search(rf"^    {v}\b", top, re.M) for v in verbs
    )
    for verb in verbs:
        done = client(verb, "--help")
        out = done.stdout.decode()
        assert done.returncode == 0, verb
        description = out.split("\n\n")[1]
        assert "\n" not in description.strip() and description.strip().endswith("."), out
        example = out.rsplit("example:\n", 1)[1]
        assert example.split()[:2] == ["event-datagram", verb], out


def test_listen_refreshes_and_prints_json(tmp_path: Path) -> None:
    with processes() as procs:
        run = RunProc(*run_args(tmp_path, unique_instance("listen")))
        procs.append(run)
        assert run.http
        args = ["udp:127.0.0.1:0", "E_OTHER", "--expire", "1", "--json", "--mi", run.http]
        listener = Proc([EXE, "listen", *args])
        procs.append(listener)
        sock = listener.wait_err(r"listening on (udp:\S+) for E_OTHER")[1]
        time.sleep(2.5)  # more than twice the expire: only the refreshes keep it
        assert sock in subscribers(run.http, "E_OTHER")
        assert client("raise", "E_OTHER", '{"a":[1,"é"]}', "--mi", run.http).returncode == 0
        line = json.loads(listener.wait_out(1)[0])
        assert line["datagram"] == {
            "jsonrpc": "2.0",
            "method": "E_OTHER",
            "params": {"a": [1, "é"]},
        }
        assert line["size"] == len(
            '{"jsonrpc":"2.0","method":"E_OTHER","params":{"a":[1,"é"]}}'.encode()
        )
        assert listener.stop(signal.SIGTERM) == 0
        assert subscribers(run.http, "E_OTHER") == {}  # unsubscribed on exit
        bad = client("listen", "tcp:1.2.3.4:5", "E_OTHER", "--mi", run.http)
        assert bad.returncode == 1 and "expected udp:IP:PORT" in bad.stderr.decode()
        bad = client("listen", "udp:127.0.0.1:0", "E_NOPE", "--mi", run.http)
        assert bad.returncode == 1 and "error 400" in bad.stderr.decode()
        assert run.stop() == 0


def _default_ports_free() -> bool:
    try:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", 8558))
            udp.bind(("127.0.0.1", 8559))
    except OSError:
        return False
    return not list_segments("default")


def test_run_with_no_arguments(tmp_path: Path) -> None:
    """The default config: loopback only, sample events, state in the state dir.

    When the default ports (or the default instance) are taken on this machine,
    the same built-in config is run with only those replaced.
    """
    args, http, udp = [], "127.0.0.1:8558", "127.0.0.1:8559"
    if not _default_ports_free():
        text = config.default_text().replace(f'"{http}"', '"127.0.0.1:0"')
        text = text.replace(f'"{udp}"', '"127.0.0.1:0"')
        text = text.replace('instance = "default"', f'instance = "{unique_instance("dflt")}"')
        (tmp_path / "default.toml").write_text(text)
        args = ["--config", str(tmp_path / "default.toml")]
    dirs = {"RUNTIME_DIRECTORY": str(tmp_path / "run"), "STATE_DIRECTORY": str(tmp_path / "state")}
    proc = Proc([EXE, "run", *args], env=dirs)
    try:
        ready = proc.wait_err(r"event-datagram ready: (.*)")[1]
        m = re.match(
            r"mi (http://127\.0\.0\.1:\d+/mi), mi datagram udp:127\.0\.0\.1:\d+, "
            r"metrics http://127\.0\.0\.1:\d+/metrics, \d+ worker\(s\), 5 event\(s\), ",
            ready,
        )
        assert m, ready
        if not args:
            assert ready.startswith(f"mi http://{http}/mi, mi datagram udp:{udp}, ")
        instance = re.search(r"instance (\S+),", ready)
        assert instance and (args or instance[1] == "default")
        state = f"state {tmp_path}/state/{instance[1]}.state.json"
        assert state in ready
        done = client("events", "--json", "--mi", m[1])
        names = [e["name"] for e in json.loads(done.stdout)["Events"]]
        assert names[0] == "E_PIKE_BLOCKED" and {"E_CORE_THRESHOLD", "E_SAMPLE"} <= set(names)
        assert proc.stop(signal.SIGINT) == 0, proc.stderr
    finally:
        proc.kill()


def test_run_failures(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[engine]\nworkers = "two"\n')
    done = client("run", "--config", str(bad))
    assert done.returncode == 2
    err = done.stderr.decode()
    assert err.count("\n") == 1  # one line, timestamped like every other
    want = f"config error in {bad}: Expected `int`, got `str` - at `$.engine.workers`"
    assert err.strip().endswith(f"event-datagram: {want}"), err
    done = client("run", "--http", "localhost:1")
    assert done.returncode == 2 and "'localhost' is not an IP address" in done.stderr.decode()
    static = tmp_path / "static.toml"
    static.write_text('[[subscription]]\nevent = "E_X"\nsocket = "udp:10.0.0.1:5"\n')
    done = client("run", "--config", str(static), "--instance", unique_instance("bad"))
    assert done.returncode == 2 and "allow-list" in done.stderr.decode()
    assert "at `$.subscription[0]`" in done.stderr.decode()
    corrupt = tmp_path / "corrupt" / "state.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"version": 1, "subscriptions": [')
    args = run_args(tmp_path, unique_instance("corrupt"))
    done = client("run", *args, "--state-file", str(corrupt))  # the last one counts
    assert done.returncode == 1 and f"state file {corrupt}: corrupt" in done.stderr.decode()
    assert corrupt.read_text() == '{"version": 1, "subscriptions": ['  # left alone
    with socket.socket() as busy, processes() as procs:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = client("run", *run_args(tmp_path, unique_instance("busy"), f"127.0.0.1:{port}"))
        assert done.returncode == 1
        assert (
            f"cannot listen on 127.0.0.1:{port} (HTTP MI): Address already in use"
            in done.stderr.decode()
        )
        instance = unique_instance("twice")
        first = RunProc(*run_args(tmp_path, instance))
        procs.append(first)
        done = client("run", *run_args(tmp_path / "x", instance))
        assert done.returncode == 1 and "already running" in done.stderr.decode()
        assert first.stop() == 0


def test_engine_failure_exits_non_zero(tmp_path: Path) -> None:
    """Workers that cannot start again (their ring is gone) stop `run` with the reason."""
    instance = unique_instance("fail")
    with processes() as procs:
        run = RunProc(*run_args(tmp_path, instance))
        procs.append(run)
        children = psutil.Process(run.popen.pid).children()
        workers = [p for p in children if p.cmdline()[-2:] == ["-m", "workers"]]
        assert len(workers) == 1
        for name in list_segments(instance):
            if "ring" in name:
                os.unlink(f"/dev/shm/{name}")
        workers[0].kill()
        assert run.popen.wait(30) == 1
        run.stop()
        assert "event-datagram: engine failed: worker 0 failed to start 3 times" in run.stderr
    assert not list_segments(instance)


def test_bench_is_reached_through_the_command() -> None:
    done = client("bench", "--help")
    assert done.returncode == 0 and b"--json" in done.stdout
