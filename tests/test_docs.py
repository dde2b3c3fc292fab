"""The reader's path: a short README, the reference in docs/, and every relative link in them resolving."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 150


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a `#` comment in a code block is no heading
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links():
    for page in PAGES:
        for target in dict.fromkeys(LINK.findall(page.read_text())):  # each link once per page
            if not re.match(r"^[a-z]+:", target):  # http(s), mailto: not ours to check
                yield pytest.param(page, target, id=f"{page.relative_to(ROOT)}->{target}")


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference text into docs/"


@pytest.mark.parametrize(("page", "target"), list(relative_links()))
def test_every_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
    if anchor:
        assert anchor in anchors(linked), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_the_link_check_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section: `make x`\n")
    assert anchors(page) == {"title", "a-section-make-x"}
    assert LINK.findall("see [this](docs/none.md#a) and [that](https://x.org)") == ["docs/none.md#a", "https://x.org"]
