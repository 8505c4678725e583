"""Groups and filters through the command and the config: `run`, `subscribe`, `listen`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.helpers.mi import EXE, Proc, RunProc, client, processes
from tests.helpers.support import udp_receiver, unique_instance


def test_config_group_cli_filter_and_listen_filter(tmp_path: Path) -> None:
    a, b = udp_receiver(), udp_receiver()
    group = f"virtual:ROUND-ROBIN {a.socket_text} {b.socket_text}"
    conf = tmp_path / "routing.toml"
    conf.write_text(
        'events = ["E_R"]\n'
        "[[subscription]]\n"
        'event = "E_R"\n'
        f'socket = "{group}"\n'
        'filter = ["kind=call*"]\n'
    )
    with processes() as procs:
        run = RunProc(
            "--config", str(conf), "--instance", unique_instance("routing"),
            "--http", "127.0.0.1:0", "--mi-datagram", "127.0.0.1:0", "--workers", "1",
            "--state-file", str(tmp_path / "state.json"),
        )  # fmt: skip
        procs.append(run)
        assert run.http and run.udp
        listener = Proc([EXE, "listen", "udp:127.0.0.1:0", "E_R", "--mi", run.udp,
                         "--filter", "ip=10.*", "--filter", "kind=*", "--json"])  # fmt: skip
        procs.append(listener)
        me = listener.wait_err(r"listening on (udp:\S+) for E_R")[1]
        spare = udp_receiver()
        done = client("subscribe", "E_R", spare.socket_text, "--filter", "ip=192.*",
                      "--mi", run.http)  # fmt: skip
        assert (done.returncode, done.stdout) == (0, b"OK\n"), done.stderr
        done = client("subscribers", "E_R", "--mi", run.http, "--json")
        subs = json.loads(done.stdout)["Event"]["Subscribers"]
        shown = {(s["socket"], s.get("filter"), s["expire"]) for s in subs}
        assert shown == {
            (spare.socket_text, "ip=192.*", 3600),
            (me, "ip=10.* kind=*", 60),
            (group, "kind=call*", "never"),
        }
        human = client("subscribers", "E_R", "--mi", run.http).stdout.decode()
        assert f"{group}  expire never  filter kind=call*" in human
        events = [
            {"kind": "call", "ip": "10.0.0.1"},  # group (a), listener
            {"kind": "callend", "ip": "192.168.1.1"},  # group (b), spare
            {"kind": "reg", "ip": "10.0.0.2"},  # listener only
            {"kind": "call-x"},  # group (a)
        ]
        for p in events:
            done = client("raise", "E_R", json.dumps(p), "--mi", run.http)
            assert done.returncode == 0, done.stderr
        got = [json.loads(line)["datagram"]["params"] for line in listener.wait_out(2)]
        assert got == [events[0], events[2]]
        assert [json.loads(d)["params"] for d in a.quiet(2)] == [events[0], events[3]]
        assert [json.loads(d)["params"] for d in b.quiet(1)] == [events[1]]
        assert [json.loads(d)["params"] for d in spare.quiet(1)] == [events[1]]
        # The unfiltered socket of the same receiver is another subscription.
        done = client("unsubscribe", "E_R", spare.socket_text, "--mi", run.http)
        assert done.returncode == 0
        done = client("subscribers", "E_R", spare.socket_text, "--mi", run.http)
        assert done.returncode == 1 and b"404" in done.stderr
        # ... and the filtered one is removed with its filter.
        done = client("unsubscribe", "E_R", spare.socket_text, "--filter", "ip=192.*",
                      "--mi", run.http)  # fmt: skip
        assert done.returncode == 0
        time.sleep(0.05)
        done = client("subscribers", "E_R", "--mi", run.http, "--json")
        assert len(json.loads(done.stdout)["Event"]["Subscribers"]) == 2
        # Hostile input over the MI: refused, named, nothing half-registered.
        hostile = (
            "virtual:failover udp:127.0.0.1:9",
            "virtual:PARALLEL",
            "virtual:FAILOVER udp:127.0.0.1:9 virtual:PARALLEL udp:127.0.0.1:8",
        )
        for bad in hostile:
            done = client("subscribe", "E_R", bad, "--mi", run.http)
            assert done.returncode == 1 and b"400" in done.stderr, bad
            assert b"virtual" in done.stderr, done.stderr  # the reason is told
        done = client("subscribe", "E_R", a.socket_text, "--filter", "x=" + "y" * 10240,
                      "--mi", run.http)  # fmt: skip
        assert done.returncode == 1 and b"at most 1024" in done.stderr
        listener.stop()
        assert run.stop() == 0, run.stderr
        assert "Traceback" not in run.stderr
    for r in (a, b, spare):
        r.close()
