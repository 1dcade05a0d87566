"""The README is a short front door and docs/ holds the rest: every relative link in them leads to a file
that exists, every #anchor to a heading of that file (GitHub's slugs), and the README stays short and
links every docs file."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
README_MAX_BYTES = 15_000

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks and code spans: links inside code are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", markdown))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation dropped except - and _,
    spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor in a Markdown file; repeated headings get -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(markdown: str) -> list[str]:
    """The targets of the inline links that stay in the repository (no scheme such as https:)."""
    return [target for target in _LINK.findall(_prose(markdown)) if not _SCHEME.match(target)]


def broken_links(page: Path) -> list[str]:
    """The relative links of one page that lead to no file, or to no heading of their target."""
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path_part, _, fragment = target.partition("#")
        file = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not file.is_file():
            broken.append(f"{target}: no file {file}")
        elif fragment and unquote(fragment) not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with that anchor in {file}")
    return broken


def test_the_slug_rules_match_githubs_anchors() -> None:
    assert github_slug("Loading cost: what OpenClaw copies") == "loading-cost-what-openclaw-copies"
    assert github_slug("Plugin config (`plugins.entries.delta-mem-mlx.config`)") == (
        "plugin-config-pluginsentriesdelta-mem-mlxconfig"
    )
    assert github_slug("Speed: δ against the plain model") == "speed-δ-against-the-plain-model"
    assert github_slug("The process supervisor's keeper") == "the-process-supervisors-keeper"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n## Some part\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\nSee [it](other.md#some-part), [here](#page), [web](https://example.com/x#y),\n"
        "`[code](missing.md)`, [gone](missing.md) and [wrong](other.md#no-such-part).\n"
        "```\n[in a block](missing.md)\n```\n",
        encoding="utf-8",
    )
    assert [problem.split(":")[0] for problem in broken_links(page)] == ["missing.md", "other.md#no-such-part"]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file_and_a_heading(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_is_short() -> None:
    assert len(README.read_bytes()) <= README_MAX_BYTES


def test_the_readme_links_every_docs_file() -> None:
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in relative_links(README.read_text("utf-8"))}
    assert DOCS, "docs/ holds the documentation"
    assert [page.name for page in DOCS if page.resolve() not in linked] == []
