"""Shared fixtures: every test runs with its own install root and no network.

Under `CI=true` every test must run: a test that would skip (a missing `node` or `npm`, a missing
optional package) fails instead, naming what is missing. Elsewhere skips stay skips, and the end of
the run says how many there were.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["model_fixtures", "engine_support", "fake_launchctl"]

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped and not IN_CI:
        terminalreporter.write_line(f"{skipped} test(s) skipped on this machine (see above); under CI=true they fail.")


@pytest.fixture(autouse=True)
def _isolated_user_paths(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may touch the developer's real install root or Hugging Face cache.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("DELTA_MEM_MLX_ROOT", str(home / "root"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
