"""Where the engine keeps its files by default, each rule checked in a subprocess
with the environment a service manager, a root shell or a user session gives it;
and an upgrade that finds the state file where 0.1 kept it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine.shm.segment import list_segments
from tests.helpers.mi import RunProc, client, processes
from tests.helpers.support import unique_instance

PROBE = "from engine import paths; print(paths.runtime_dir()); print(paths.state_dir())"
CLEAN = ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "HOME")


def probe(env: dict[str, str], as_nobody: bool = False) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", PROBE]
        cwd = None
        if as_nobody:
            # nobody cannot read a checkout (or its venv) under a private directory,
            # as CI's clone is: run the system interpreter on a world-readable copy of
            # the package's two modules it needs (paths.py uses the standard library only).
            package = Path(tmp) / "engine"
            package.mkdir()
            for name in ("__init__.py", "paths.py"):
                shutil.copy(Path(__file__).parents[2] / "engine" / name, package / name)
            for path in (Path(tmp), package, *package.iterdir()):
                path.chmod(0o755)
            cwd = tmp
            interpreter = os.path.realpath(sys.executable)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            cmd += [interpreter, "-c", PROBE]
        done = subprocess.run(
            cmd,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=cwd,
        )
    assert done.returncode == 0, done.stderr
    runtime, state = done.stdout.split()
    return runtime, state


def test_systemd_directories_come_first() -> None:
    env = {
        "RUNTIME_DIRECTORY": "/run/event-datagram",
        "STATE_DIRECTORY": "/var/lib/event-datagram:/var/lib/other",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "XDG_STATE_HOME": "/home/u/.local/state",
    }
    assert probe(env) == ("/run/event-datagram", "/var/lib/event-datagram")


@pytest.mark.skipif(os.geteuid() != 0, reason="the root defaults need root")
def test_root_without_systemd_uses_run_and_var_lib() -> None:
    assert probe({"HOME": "/root"}) == ("/run/event-datagram", "/var/lib/event-datagram")


def _as_nobody_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


@pytest.mark.skipif(not _as_nobody_possible(), reason="needs root and setpriv to become nobody")
def test_a_user_gets_the_xdg_directories() -> None:
    env = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert probe(env, as_nobody=True) == (
        "/run/user/1000/event-datagram",
        "/home/u/.local/state/event-datagram",
    )
    env = {"HOME": "/home/u", "XDG_STATE_HOME": "/srv/state"}
    assert probe(env, as_nobody=True) == ("/tmp/event-datagram", "/srv/state/event-datagram")


def _config(tmp_path: Path, instance: str, state_line: str) -> Path:
    cfg = tmp_path / f"{instance}.toml"
    cfg.write_text(
        f'events = ["E_A"]\n[engine]\ninstance = "{instance}"\nworkers = 1\npin = false\n'
        f'runtime_dir = "{tmp_path / "run"}"\n'
        f'[mi]\nhttp = ""\ndatagram = "127.0.0.1:0"\n[state]\n{state_line}\n'
    )
    return cfg


def test_an_upgrade_moves_the_state_file_from_the_runtime_directory(tmp_path: Path) -> None:
    instance = unique_instance("mig")
    old = tmp_path / "run" / f"{instance}.state.json"
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    with processes() as procs:
        # 0.1 kept the default state file in the runtime directory.
        first = RunProc("--config", str(_config(tmp_path, instance, f'file = "{old}"')), env=env)
        procs.append(first)
        assert first.udp
        done = client("subscribe", "E_A", "udp:127.0.0.1:9999", "600", "--mi", first.udp)
        assert done.returncode == 0, done.stderr
        assert first.stop() == 0, first.stderr
        assert old.exists()
        # The new version, state.file left at its default: found, moved, still subscribed.
        run = RunProc("--config", str(_config(tmp_path, instance, "")), env=env)
        procs.append(run)
        new = tmp_path / "state" / f"{instance}.state.json"
        assert f"state {new}" in run.ready
        assert f"moved the state file of an older version from {old} to {new}" in run.stderr
        assert new.exists() and not old.exists()
        assert run.udp
        done = client("subscribers", "E_A", "--json", "--mi", run.udp)
        subs = json.loads(done.stdout)["Event"]["Subscribers"]
        assert [s["socket"] for s in subs] == ["udp:127.0.0.1:9999"]
        assert run.stop() == 0, run.stderr
    assert not list_segments(instance)
    assert not (tmp_path / "run" / f"{instance}.lock").exists()


def test_the_reload_verb_signals_the_engine_of_the_config(tmp_path: Path) -> None:
    instance = unique_instance("rlv")
    cfg = _config(tmp_path, instance, "enabled = false")
    done = client("reload", "--config", str(cfg))
    assert done.returncode == 1 and b"no engine of instance" in done.stderr
    with processes() as procs:
        run = RunProc("--config", str(cfg))
        procs.append(run)
        done = client("reload", "--config", str(cfg))
        assert done.returncode == 0, done.stderr
        assert f"sent SIGHUP to pid {run.popen.pid}".encode() in done.stdout
        run.wait_err(r"reloaded the config from")
        assert run.stop() == 0
