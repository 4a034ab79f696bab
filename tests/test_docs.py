"""The front page and docs/ hold together: every relative link points at a file that exists,
every docs page is linked from the front page, and the front page stays a front page."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # fenced blocks and inline code


def links(text: str) -> list[str]:
    """The link targets of a Markdown text, outside code."""
    return LINK.findall(CODE.sub("", text))


def _pages():
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve():
    broken = []
    for page in _pages():
        for target in links(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_link_check_sees_a_broken_link(tmp_path):  # negative control for the pattern
    page = tmp_path / "page.md"
    page.write_text("see [this](missing.md#part) and ![x](img/none.png), not `k[g](...)`")
    assert links(page.read_text()) == ["missing.md", "img/none.png"]


def test_every_docs_page_is_linked_from_the_front_page():
    front = (ROOT / "README.md").read_text()
    linked = {pathlib.Path(t).name for t in links(front) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, sorted(pages - linked)


def test_front_page_is_short_and_states_its_times():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "BENCH_TIME" not in text and "TEST_TIME" not in text  # measured figures filled in
