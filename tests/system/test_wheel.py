"""The project as a user installs it: a wheel built from this checkout, installed
into a fresh venv (its dependencies from the package index), and its command run
from a directory that is not the checkout, so nothing can come from the source
tree by accident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.helpers.support import REPO

PACKAGES = ("engine", "workers")
MUST_SHIP = [
    "engine/__init__.py",
    "engine/__main__.py",
    "engine/default.toml",
    "engine/py.typed",
    "engine/shm/__init__.py",
    "engine/mi/__init__.py",
    "engine/cli/__init__.py",
    "engine/bench/__init__.py",
    "engine/sources/__init__.py",
    "workers/__init__.py",
    "workers/__main__.py",
]


def run(
    args: Sequence[str | Path], cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited {done.returncode}\n"
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    return done


def source_files() -> set[str]:
    """What the wheel must hold of the packages: every .py file and every subpackage."""
    return {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, "."], REPO, 300)
    wheels = list(dist.glob("event_datagram-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
    missing = [name for name in MUST_SHIP if name not in names]
    assert not missing, f"the wheel lacks {missing}"
    shipped = {n for n in names if n.split("/")[0] in PACKAGES and n.endswith(".py")}
    assert source_files() - shipped == set(), "modules missing from the wheel"
    stale = shipped - source_files()  # setuptools reuses build/lib: deleted modules linger
    assert not stale, f"the wheel holds modules the source does not: {stale} (make clean)"
    assert not [n for n in names if n.startswith("tests/")], "the tests were packaged"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, 120)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: `engine` can only be the installed one
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python, command = venv / "bin" / "python", venv / "bin" / "event-datagram"
    run([python, "-m", "pip", "install", "--quiet", wheels[0]], elsewhere, 300, env)

    where = run(
        [python, "-c", "import engine, workers; print(engine.__file__); print(workers.__file__)"],
        elsewhere,
        60,
        env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    usage = run([command, "run", "--help"], elsewhere, 60, env)
    assert "--config" in usage.stdout

    out = tmp_path / "bench.json"
    bench = ["bench", "--duration", "1", "--rounds", "1", "--latency-duration", "0"]
    run([command, *bench, "--no-ceiling", "--json", out, "--quiet"], elsewhere, 300, env)
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["error"] is None and doc["interrupted"] is None, doc["error"]
    engine_rounds = [r for r in doc["rounds"] if r["contender"] == "engine"]
    assert engine_rounds and all(r["datagrams_received"] > 0 for r in engine_rounds), doc["rounds"]
