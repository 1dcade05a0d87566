"""The README's quick start and CI agree: .ci/run sets up the environment as the quick start does and
runs the quick start's test command, word for word."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    """The lines of the README's quick-start code block."""
    section = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("\n## Quick start\n", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def test_ci_sets_up_and_tests_as_the_quick_start_says() -> None:
    set_up, test_command = quick_start_commands()
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()]
    make_venv, link_venv = set_up.split(" && ")[:2]
    assert make_venv in ci, "CI must make the venv where the quick start does"
    assert link_venv in ci, "CI must link it as .venv as the quick start does"
    assert ci[-1] == test_command
