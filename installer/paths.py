"""Where an install lives by default: one function, with an environment override."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ROOT_ENV = "DELTA_MEM_MLX_ROOT"
APP_NAME = "openclaw-delta-mem-mlx"


def default_root() -> Path:
    """The install root: $DELTA_MEM_MLX_ROOT if set, else the user data dir."""
    override = os.environ.get(ROOT_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
