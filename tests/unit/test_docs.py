"""The documentation holds together: every relative link in README.md and docs/*.md
points at a file that exists (and an anchor at a heading of it), the README
stays a front page, and it links to every document under docs/."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers.support import REPO

DOCS = REPO / "docs"
# Written by other engineers in parallel (issue 18, items 2-5); linked before
# they land. Remove a name from here once its file is in the tree.
ELSEWHERE = {
    "operations.md",
    "security-http.md",
    "security-guards.md",
    "broker-hardening.md",
    "upstream-hardening.md",
    "notifications.md",
}
OURS = {
    "cli.md",
    "configuration.md",
    "mi.md",
    "opensips.md",
    "metrics.md",
    "benchmark.md",
    "design.md",
    "development.md",
}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_every_relative_link_points_at_a_file() -> None:
    broken = []
    checked = 0
    for page in pages():
        for target in relative_links(page):
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                if dest.parent == DOCS and dest.name in ELSEWHERE:
                    continue
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert checked > 40, checked
    assert not broken, "\n".join(broken)


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[a](missing.md) [b](#title) [c](#nope) `[d](x.md)` [e](https://x)\n"
    )
    assert relative_links(page) == ["missing.md", "#title", "#nope"]
    assert anchors(page) == {"title"}


def test_the_readme_is_a_front_page_linking_every_document() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024, len(readme.encode())
    for command in ("make run", "make test"):
        assert f"    {command}" in readme
    assert {p.name for p in DOCS.glob("*.md")} >= OURS
    linked = {Path(t.partition("#")[0]).name for t in relative_links(REPO / "README.md")}
    assert linked >= OURS | ELSEWHERE | {"LICENSE"}, sorted(OURS | ELSEWHERE - linked)


def test_the_license_matches_pyproject() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text
    assert re.search(r'^license = "GPL-2.0-or-later"$', (REPO / "pyproject.toml").read_text(), re.M)
