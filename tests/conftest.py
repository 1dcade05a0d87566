"""Shared fixtures: every test runs with its own install root and no network."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["model_fixtures", "engine_support"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_user_paths(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may touch the developer's real install root or Hugging Face cache.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("DELTA_MEM_MLX_ROOT", str(home / "root"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
