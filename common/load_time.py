"""How long this root's sidecar takes to become ready, as it measured itself at its last start.

`serve --root` writes it once its model has loaded; `provider-config` reads it to give OpenClaw's
localService a `readyTimeoutMs` that fits this machine (with a margin).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.files import atomic_write_json, read_regular_file
from common.layout import RootLayout

MAX_RECORD_BYTES = 64 * 1024
# Until the sidecar has measured itself: a 4B model from a cold disk, imports included.
DEFAULT_READY_TIMEOUT_S = 180
# A start may meet a cold disk cache or a busy machine: give it this many times the measured time.
READY_MARGIN = 3.0
MIN_READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class LoadTime:
    """Seconds from the process's start to a loaded model, and the model load within them."""

    ready_s: float
    load_s: float
    recorded_at: str


def record_load_time(root: Path, ready_s: float, load_s: float) -> None:
    """Write the measured start and load time into the root (atomically)."""
    record = {
        "ready_s": round(ready_s, 3),
        "load_s": round(load_s, 3),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(RootLayout.of(root).load_time, record)


def read_load_time(root: Path) -> LoadTime | None:
    """The last measured start and load time, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads(read_regular_file(RootLayout.of(root).load_time, MAX_RECORD_BYTES))
        record = LoadTime(float(data["ready_s"]), float(data["load_s"]), str(data["recorded_at"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not (math.isfinite(record.ready_s) and record.ready_s >= 0):
        return None
    return record


def ready_timeout_s(root: Path) -> int:
    """How long OpenClaw should wait for a started sidecar: the measured start × the margin, else a default."""
    record = read_load_time(root)
    if record is None:
        return DEFAULT_READY_TIMEOUT_S
    return max(MIN_READY_TIMEOUT_S, math.ceil(record.ready_s * READY_MARGIN))
