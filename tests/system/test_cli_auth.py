"""The engine's own clients against an MI that requires TLS and basic auth (a
`run` engine with a web config): the CLI's subscribe, subscribers, raise and
listen with --ca-file and a password from a file or the environment; a wrong
password, an untrusted certificate and a password in the URL refused clearly,
never printing it; no password in the CLI's /proc/PID/cmdline; and an
[[upstream]] over https with auth (an engine playing the upstream)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

from tests.helpers.mi import EXE, Proc, RunProc, client, processes
from tests.helpers.support import eventually, udp_receiver, unique_instance
from tests.helpers.tls import PASSWORD, USER, TLSFiles, web_config

NO_ENV = {"EVENT_DATAGRAM_MI_USER": "", "EVENT_DATAGRAM_MI_PASSWORD": "", "EVENT_DATAGRAM_MI": ""}


def _config(tmp_path: Path, name: str, *extra: str) -> Path:
    lines = ['events = ["E_SAMPLE", "E_OTHER"]', "[engine]", "workers = 1", "pin = false",
             f'instance = "{unique_instance(name)}"', f'runtime_dir = "{tmp_path}"',
             "[state]", "enabled = false", "[mi]", 'http = "127.0.0.1:0"', 'datagram = ""',
             *extra]  # fmt: skip
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _secure_engine(tmp_path: Path, tls: TLSFiles, name: str, *extra: str) -> RunProc:
    web = web_config(tmp_path / f"{name}.yml", tls)
    proc = RunProc("--config", str(_config(tmp_path, name, *extra)), "--web-config", str(web))
    return proc


def _mi(proc: RunProc) -> str:
    found = re.search(r"mi (https://\S+/mi)", proc.ready)
    assert found, proc.ready
    return found[1]


def _text(done: object) -> str:
    out = done.stdout + done.stderr  # type: ignore[attr-defined]
    return out.decode() if isinstance(out, bytes) else str(out)


def test_cli_verbs_over_tls_with_basic_auth(tmp_path: Path) -> None:
    tls = TLSFiles.make(tmp_path)
    password_file = tmp_path / "mi-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    with processes() as started:
        engine = _secure_engine(tmp_path, tls, "secure")
        started.append(engine)
        mi = _mi(engine)
        ca = ["--ca-file", str(tls.ca.path)]
        with_file = ["--mi", mi, *ca, "--user", USER, "--password-file", str(password_file)]
        env = {**NO_ENV, "EVENT_DATAGRAM_MI_PASSWORD": PASSWORD}
        receiver = udp_receiver()
        try:
            # subscribe with a password file, subscribers with the URL's user + the env
            done = client("subscribe", "E_SAMPLE", receiver.socket_text, *with_file, env=NO_ENV)
            assert done.returncode == 0, _text(done)
            url_user = mi.replace("https://", f"https://{USER}@")
            done = client("subscribers", "E_SAMPLE", "--json", "--mi", url_user, *ca, env=env)
            assert done.returncode == 0, _text(done)
            subs = json.loads(done.stdout)["Event"]["Subscribers"]
            assert [s["socket"] for s in subs] == [receiver.socket_text]
            # raise with $EVENT_DATAGRAM_MI and $EVENT_DATAGRAM_MI_USER: the datagram arrives
            env_all = {**env, "EVENT_DATAGRAM_MI": mi, "EVENT_DATAGRAM_MI_USER": USER}
            done = client("raise", "E_SAMPLE", '{"ip":"10.1.2.3"}', *ca, env=env_all)
            assert done.returncode == 0, _text(done)
            got = json.loads(receiver.wait_for(1)[0])
            assert got["method"] == "E_SAMPLE" and got["params"] == {"ip": "10.1.2.3"}
        finally:
            receiver.close()

        # listen: subscribes, prints what arrives, unsubscribes on exit; its argv
        # (/proc/PID/cmdline) holds the file's path, never the password.
        listener = Proc([EXE, "listen", "udp:127.0.0.1:0", "E_OTHER", "--json", *with_file],
                        env=NO_ENV)  # fmt: skip
        started.append(listener)
        me = listener.wait_err(r"listening on (udp:\S+) for E_OTHER")[1]
        cmdline = Path(f"/proc/{listener.popen.pid}/cmdline").read_bytes()
        assert str(password_file).encode() in cmdline and PASSWORD.encode() not in cmdline
        done = client("raise", "E_OTHER", '{"n":1}', *with_file, env=NO_ENV)
        assert done.returncode == 0, _text(done)
        line = json.loads(listener.wait_out(1)[0])
        assert line["datagram"]["params"] == {"n": 1}
        assert listener.stop(signal.SIGTERM) == 0, listener.stderr
        done = client("subscribers", "E_OTHER", "--json", *with_file, env=NO_ENV)
        assert done.returncode == 0 and me not in done.stdout.decode()

        # A wrong password: exit 1, a clear message, the password nowhere.
        wrong = "not-the-" + PASSWORD
        bad_env = {**NO_ENV, "EVENT_DATAGRAM_MI_PASSWORD": wrong}
        done = client("subscribers", "--mi", mi, *ca, "--user", USER, env=bad_env)
        assert done.returncode == 1
        assert "authentication failed (HTTP 401)" in done.stderr.decode()
        assert wrong not in _text(done) and PASSWORD not in _text(done)
        # No credentials at all: the same clear 401.
        done = client("events", "--mi", mi, *ca, env=NO_ENV)
        assert done.returncode == 1 and "authentication failed" in done.stderr.decode()
        # Without --ca-file the engine's certificate is not trusted.
        done = client("events", "--mi", mi, "--user", USER, env=env)
        assert done.returncode == 1 and "certificate is not trusted" in done.stderr.decode()
        # A password in the URL is refused before anything is sent, and not echoed.
        in_url = mi.replace("https://", f"https://{USER}:{PASSWORD}@")
        done = client("events", "--mi", in_url, *ca, env=NO_ENV)
        assert done.returncode == 2
        assert "a password in the MI URL is refused" in done.stderr.decode()
        assert PASSWORD not in _text(done)
        # Plain HTTP to the TLS port: a clear failure, not a hang.
        done = client("events", "--mi", mi.replace("https", "http"), env=env_all)
        assert done.returncode == 1, _text(done)
        assert engine.stop() == 0
    assert PASSWORD not in engine.stderr and wrong not in engine.stderr


def test_an_upstream_over_https_with_basic_auth(tmp_path: Path) -> None:
    tls = TLSFiles.make(tmp_path)
    password_file = tmp_path / "upstream-password"
    password_file.write_text(PASSWORD + "\n")
    with processes() as started:
        upstream = _secure_engine(tmp_path, tls, "upstream")
        started.append(upstream)
        mi = _mi(upstream)
        relay_config = _config(
            tmp_path, "relay",
            "[ingest]", 'listen = ["udp:127.0.0.1:0"]',
            "[[upstream]]", f'mi = "{mi}"', 'events = ["E_SAMPLE"]', "expire = 30",
            f'ca_file = "{tls.ca.path}"', f'user = "{USER}"', f'password_file = "{password_file}"',
        )  # fmt: skip
        relay = RunProc("--config", str(relay_config))
        started.append(relay)
        assert relay.http
        auth = ["--mi", mi, "--ca-file", str(tls.ca.path), "--user", USER]
        env = {**NO_ENV, "EVENT_DATAGRAM_MI_PASSWORD": PASSWORD}

        def subscribed() -> list[str]:
            done = client("subscribers", "E_SAMPLE", "--json", *auth, env=env)
            assert done.returncode == 0, _text(done)
            event = json.loads(done.stdout).get("Event") or {}
            return [s["socket"] for s in event.get("Subscribers", [])]

        eventually(lambda: len(subscribed()) == 1, timeout=30, what="the relay subscribed")
        # An event raised at the upstream reaches a subscriber of the relay.
        receiver = udp_receiver()
        try:
            sub = client("subscribe", "E_SAMPLE", receiver.socket_text, "--mi", relay.http)
            assert sub.returncode == 0, _text(sub)
            done = client("raise", "E_SAMPLE", '{"via":"https"}', *auth, env=env)
            assert done.returncode == 0, _text(done)
            got = json.loads(receiver.wait_for(1)[0])
            assert got["params"] == {"via": "https"}
        finally:
            receiver.close()
        assert relay.stop() == 0
        assert PASSWORD not in relay.stderr
        eventually(lambda: subscribed() == [], timeout=30, what="the relay unsubscribed")
        assert upstream.stop() == 0


def test_an_upstream_with_a_wrong_password_never_subscribes_and_says_so(tmp_path: Path) -> None:
    tls = TLSFiles.make(tmp_path)
    password_file = tmp_path / "wrong-password"
    wrong = "wrong-" + PASSWORD
    password_file.write_text(wrong + "\n")
    with processes() as started:
        upstream = _secure_engine(tmp_path, tls, "upstream")
        started.append(upstream)
        mi = _mi(upstream)
        relay_config = _config(
            tmp_path, "relay",
            "[ingest]", 'listen = ["udp:127.0.0.1:0"]',
            "[[upstream]]", f'mi = "{mi}"', 'events = ["E_SAMPLE"]',
            f'ca_file = "{tls.ca.path}"', f'user = "{USER}"', f'password_file = "{password_file}"',
        )  # fmt: skip
        relay = RunProc("--config", str(relay_config))
        started.append(relay)
        relay.wait_err(r"authentication failed \(HTTP 401\)", timeout=30)
        assert relay.stop() == 0
        assert wrong not in relay.stderr and PASSWORD not in relay.stderr
        assert upstream.stop() == 0
