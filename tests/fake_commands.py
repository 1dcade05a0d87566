"""Fake commands for tests: a script put first on PATH, where the code under test finds it as a user's would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def command_on_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path, name: str, script: str) -> Path:
    """Write an executable `name` into `bin_dir` and put that folder first on PATH; returns the script."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return path
