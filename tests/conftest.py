"""What every test shares: the `slow` marker by folder, and the one engine factory.

tests/unit holds in-process tests only; every test under tests/integration and
tests/system (real processes) is marked `slow`, here, by where it lives.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
