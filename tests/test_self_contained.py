"""A clone of this repository alone tests itself: no code reads a folder beside it.

The engineers' machine keeps tools and captures in a `shared` folder next to the clone; CI's clone has
none. Every code, script and config file of tests/, bench/, .ci/, the product packages and the root is
scanned for a path into it. Markdown is left out: a README may say where a file was copied from.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("tests", "bench", ".ci", "common", "sidecar", "supervisors", "presets", "plugin_tools", "installer")
CODE_SUFFIXES = {".py", ".js", ".mjs", ".cjs", ".ts", ".sh", ".json", ".toml", ".yaml", ".yml", ".cfg", ".ini"}
SKIPPED_DIRS = {"__pycache__", "node_modules"}
# A path to the folder beside the clone: relative, absolute, or built with pathlib from a parent.
OUTSIDE = re.compile(r"""\.\./shared\b|/work/shared\b|\bparents?\s*(\[\s*\d+\s*\])?\s*/\s*["']shared["']""")


def _code_files() -> list[Path]:
    files = [p for p in REPO.iterdir() if p.is_file() and p.suffix in CODE_SUFFIXES]
    for top in SCANNED:
        for path in (REPO / top).rglob("*"):
            in_ci = top == ".ci" and path.suffix == ""  # its scripts have no suffix
            if path.is_file() and (path.suffix in CODE_SUFFIXES or in_ci) and not SKIPPED_DIRS & set(path.parts):
                files.append(path)
    # This file names the patterns it looks for.
    return [p for p in files if p != Path(__file__).resolve()]


SIBLING = "shared"


def offending_lines(text: str) -> list[str]:
    """The lines of `text` that name a path outside the repository."""
    return [line.strip() for line in text.splitlines() if OUTSIDE.search(line)]


def test_the_patterns_catch_every_way_of_writing_the_path() -> None:
    # Written with the folder's name apart, so that a plain grep of this file finds no such path.
    caught = [
        f'turns = "../{SIBLING}/openclaw/agent-turns.json"',
        f'SHARED = REPO.parent / "{SIBLING}"',
        "tool = Path(__file__).resolve().parents[2] / 'shared' / 'tools'",
        "python /work/shared/tools/qwen_vocab.py out",
    ]
    missed = ['cache = REPO / ".cache" / "shared-prefix"', "the shared prefix cache", "parent / 'sharedx'"]
    assert [bool(offending_lines(line)) for line in caught + missed] == [True] * len(caught) + [False] * len(missed)


def test_no_code_reads_a_folder_beside_the_clone() -> None:
    files = _code_files()
    assert REPO / ".ci" / "run" in files and REPO / "bench" / "memory.py" in files and len(files) > 100
    found = {
        str(path.relative_to(REPO)): lines
        for path in files
        if (lines := offending_lines(path.read_text(encoding="utf-8", errors="replace")))
    }
    assert found == {}, "read from the repository instead (tests/fixtures/, sidecar/testing/)"
