"""Every module of a package is named in that package's layout comment (the
docstring of its `__init__.py`), so the comment stays true as modules come and go."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "engine",
    "engine/shm",
    "engine/mi",
    "engine/cli",
    "engine/sources",
    "workers",
    "tests/helpers",
    "engine/bench",
    "engine/bench/rounds",
    "engine/bench/probes",
    "engine/testing",
)


def _modules(package: Path) -> list[str]:
    return sorted(
        p.name
        for p in package.glob("*.py")
        if not (p.name.startswith("__") and p.name.endswith("__.py"))
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_layout_comment_names_every_module(package: str) -> None:
    folder = ROOT / package
    comment = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    assert comment, f"{package}/__init__.py has no layout comment"
    missing = [name for name in _modules(folder) if name not in comment]
    assert not missing, f"{package}/__init__.py does not name {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_layout_comment_names_no_module_that_is_gone(package: str) -> None:
    folder = ROOT / package
    comment = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    named = {
        word.strip("(),.:;") for word in comment.split() if word.strip("(),.:;").endswith(".py")
    }
    # The top package's comment also names the modules of its folders.
    here = {p.name for p in folder.rglob("*.py")}
    gone = sorted(n for n in named if "/" not in n and n not in here)
    assert not gone, f"{package}/__init__.py names modules that do not exist: {gone}"


LONG: int = 500  # lines; a longer module says why at its top


def test_long_modules_say_why() -> None:
    unexplained = []
    for top in ("engine", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            if text.count("\n") <= LONG:
                continue
            if "Why this is long:" not in (ast.get_docstring(ast.parse(text)) or ""):
                unexplained.append(rel)
    assert not unexplained, f"over {LONG} lines, no reason at the top: {unexplained}"
