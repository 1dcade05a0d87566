"""Where an install root is, and where things live inside it; every module asks here instead of
joining paths itself."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from common.settings import settings_path

ROOT_ENV = "DELTA_MEM_MLX_ROOT"
APP_NAME = "openclaw-delta-mem-mlx"


def default_root() -> Path:
    """The install root: $DELTA_MEM_MLX_ROOT if set, else the user data dir."""
    override = os.environ.get(ROOT_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


@dataclass(frozen=True)
class RootLayout:
    """The files and folders of one install root."""

    root: Path

    @classmethod
    def of(cls, root: Path) -> RootLayout:
        """The layout of `root`, made absolute so supervisors and receipts never see relative paths."""
        return cls(Path(root).expanduser().absolute())

    @property
    def settings(self) -> Path:
        """The sidecar's settings file (written by install, read by `serve`)."""
        return settings_path(self.root)

    @property
    def receipt(self) -> Path:
        """The install receipt, written last."""
        return self.root / "receipt.json"

    @property
    def models(self) -> Path:
        """Downloaded models, one folder per Hub repo."""
        return self.root / "models"

    @property
    def adapters(self) -> Path:
        """δ-mem adapters, one folder per source."""
        return self.root / "adapters"

    @property
    def state(self) -> Path:
        """Persisted per-session δ-states (the server writes here)."""
        return self.root / "state"

    @property
    def logs(self) -> Path:
        """The sidecar's stdout and stderr logs."""
        return self.root / "logs"

    @property
    def stdout_log(self) -> Path:
        """Where the supervised sidecar's stdout goes."""
        return self.logs / "sidecar.out.log"

    @property
    def stderr_log(self) -> Path:
        """Where the supervised sidecar's stderr goes."""
        return self.logs / "sidecar.err.log"

    @property
    def pidfile(self) -> Path:
        """The process supervisor's record of the running sidecar."""
        return self.root / "run" / "sidecar.pid.json"

    @property
    def load_time(self) -> Path:
        """How long the sidecar took to start and load its model, as it last measured it."""
        return self.root / "model-load-time.json"

    def model_dir(self, repo: str) -> Path:
        """Where a Hub model repo is downloaded."""
        return self.models / repo.replace("/", "--")

    def adapter_dir(self, repo: str | None) -> Path:
        """Where an adapter from a Hub repo (or, for None, a local directory) is kept."""
        return self.adapters / (repo.replace("/", "--") if repo else "local")

    @property
    def tag(self) -> str:
        """A short stable id for this root, used to name its launchd job or systemd unit."""
        return hashlib.sha256(str(self.root).encode("utf-8")).hexdigest()[:10]
