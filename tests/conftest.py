"""What every test shares: the `slow` marker by folder, and the one engine factory.

tests/unit holds in-process tests only; every test under tests/integration and
tests/system (real processes) is marked `slow`, here, by where it lives.

Engines come from tests.helpers.support.running_engine (only tests of Engine.start itself,
and the scripts that tests run as child processes, build their own):

- `with running_engine(events, **options) as engine:` where a test stops it itself;
- the `make_engine` fixture: `engine = make_engine(events, **options)`, stopped
  (and checked clean) when the test ends;
- the module-scoped `engine` fixture: one engine shared by a module's tests, set
  up with the module's `ENGINE` dict of running_engine arguments.

A ring of RING_CAPACITY bytes in a real shared-memory segment: the `ring`
fixture (and `segment`, the segment under it), for unit and integration tests.

A real RabbitMQ (tests.helpers.broker, engine.testing.broker.LocalBroker), started
only when a test asks for one:

- the session-scoped `rabbitmq` fixture: one broker shared by the whole session
  (do not kill or stop it);
- the `fresh_rabbitmq` fixture: a broker of the test's own, to kill and restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from engine.producer import Engine
from engine.shm.ring import Ring, segment_size
from engine.shm.segment import Segment, segment_name
from engine.testing.broker import LocalBroker
from tests.helpers.broker import running_broker
from tests.helpers.support import RING_CAPACITY, running_engine, unique_instance

TESTS = Path(__file__).resolve().parent
SLOW_FOLDERS = ("integration", "system")


def _folder(item: pytest.Item) -> str | None:
    try:
        return item.path.relative_to(TESTS).parts[0]
    except ValueError:
        return None  # not under tests/


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = _folder(item)
        if folder is None:
            continue
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
        elif folder != "unit":
            raise pytest.UsageError(
                f"{item.nodeid}: a test lives in tests/unit, tests/integration or tests/system"
            )
        elif item.get_closest_marker("slow"):
            raise pytest.UsageError(
                f"{item.nodeid} is marked slow: a slow test belongs in tests/integration "
                "or tests/system, not tests/unit"
            )


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    """Start engines with running_engine's arguments; all are stopped after the test."""
    with ExitStack() as stack:

        def make(*args: Any, **kwargs: Any) -> Engine:
            return stack.enter_context(running_engine(*args, **kwargs))

        yield make


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """One engine for a whole module, set up as the module's `ENGINE` dict says."""
    setup = getattr(request.module, "ENGINE", None)
    if setup is None:
        raise pytest.UsageError(f"{request.module.__name__} uses `engine` but sets no ENGINE")
    with running_engine(**setup) as shared:
        yield shared


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[LocalBroker]:
    """One started private RabbitMQ for the session (`.url`, `.port`); shared: never
    kill or stop it (use `fresh_rabbitmq`)."""
    with running_broker() as broker:
        yield broker


@pytest.fixture
def fresh_rabbitmq() -> Iterator[LocalBroker]:
    """A started private RabbitMQ of this test's own: kill(), stop(), start() at will;
    closed (killed, its directory removed) when the test ends."""
    with running_broker() as broker:
        yield broker


@pytest.fixture(scope="session", autouse=True)
def _private_directories(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Engines of the tests (and the processes they start, which inherit the
    environment) keep their locks, sockets and state files in a directory of the
    session, never in the machine's shared ones (/tmp/event-datagram, /run,
    /var/lib/event-datagram, ~/.local/state). Tests of those defaults set the
    variables themselves, in a subprocess."""
    base = tmp_path_factory.mktemp("engine-dirs")
    saved = {k: os.environ.get(k) for k in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY")}
    os.environ["RUNTIME_DIRECTORY"] = str(base / "run")
    os.environ["STATE_DIRECTORY"] = str(base / "state")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def segment() -> Iterator[Segment]:
    """A shared-memory segment holding a formatted ring of RING_CAPACITY bytes."""
    seg = Segment.create(segment_name(unique_instance("ring"), "r"), segment_size(RING_CAPACITY))
    Ring.format(seg.buf, RING_CAPACITY)
    yield seg
    seg.unlink()
    seg.close()


@pytest.fixture
def ring(segment: Segment) -> Iterator[Ring]:
    """The producer's view of `segment`'s ring."""
    r = Ring(segment.buf)
    yield r
    r.release()
