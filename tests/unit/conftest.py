"""tests/unit: in-process tests only (no worker processes, no servers).

The `clock` fixture is a settable clock (tests.helpers.support.Clock) for code that takes
one; the `ring` fixture (tests/conftest.py) is shared with tests/integration.
"""

from __future__ import annotations

import pytest

from tests.helpers.support import Clock


@pytest.fixture
def clock() -> Clock:
    """A clock at a fixed time, moved only by `clock.advance(seconds)`."""
    return Clock()
