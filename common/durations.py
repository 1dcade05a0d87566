"""Durations as people write them (`5m`, `30s`, `1h`, `300`), for --keep-alive and --idle-stop."""

from __future__ import annotations

import math
import re

from common.errors import UserError

NEVER = ("0", "never", "off")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smh]?)$")
# A week: beyond it "never" says what is meant.
MAX_DURATION_S = 7 * 24 * 3600.0


class DurationError(UserError, ValueError):
    """A duration that cannot be read, with the forms that can."""


def parse_duration(text: str) -> float:
    """Seconds in `text`: `300` or `300s`, `5m`, `1h`, `1.5h`; `0`, `never` or `off` give 0 (never)."""
    value = text.strip().lower()
    if value in NEVER:
        return 0.0
    match = _DURATION.match(value)
    if match is None:
        raise DurationError(f"{text!r} is not a duration: write seconds (300), 30s, 5m, 1h, or 0/never")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        raise DurationError(f"{text!r} is longer than a week: write 'never' to never stop")
    return seconds


def format_duration(seconds: float) -> str:
    """`never`, or the shortest of `Nh`, `Nm`, `Ns` that says `seconds` exactly."""
    if seconds <= 0:
        return "never"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
