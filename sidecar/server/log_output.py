"""The sidecar's log: one stream (stderr), repeats rate-limited, and the output files capped in size.

Supervisors (launchd, systemd, the process keeper) point the sidecar's stdout and stderr at files in
the root and keep them open, each opened for appending. Renaming such a file would leave every
writer on the renamed one (and a restarted sidecar inherits the keeper's descriptors), so the
sidecar rotates them in place: once a file passes its size cap, its content is copied to `<name>.1`
and the file is truncated. Appending writers then continue at the new end, whoever opened them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sidecar.log")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Warnings and errors of one kind (same logger, level and message template) are logged at most
# this many times per window; the rest are counted and the count is logged with the next one.
REPEAT_BURST = 5
REPEAT_WINDOW_S = 60.0
_MAX_KINDS = 1024


class OutputCap:
    """Keeps one output file (an open descriptor naming `path`) under `max_bytes`, rotating in place."""

    def __init__(self, fd: int, path: Path, max_bytes: int) -> None:
        self.fd = fd
        self.path = path
        self.max_bytes = max_bytes
        # Appending writers follow a truncation; one writing at its own offset would leave a hole.
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)

    @classmethod
    def of(cls, fd: int, path: Path, max_bytes: int) -> OutputCap | None:
        """A cap for `fd` if it is the file at `path` (a supervised sidecar's log), else None."""
        try:
            here, there = os.fstat(fd), os.stat(path)
        except OSError:
            return None
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            return None
        return cls(fd, path, max_bytes)

    def check(self) -> None:
        """Rotate the file if it has grown past the cap."""
        size = os.fstat(self.fd).st_size
        if size > self.max_bytes:
            self.rotate(size)

    def rotate(self, size: int) -> None:
        """Copy the file to `<name>.1`, then empty it."""
        backup = self.path.with_name(self.path.name + ".1")
        staging = backup.with_name(backup.name + ".tmp")
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                shutil.copyfile(self.path, staging)
                os.replace(staging, backup)
        except OSError:
            # A full disk: losing the old lines is better than filling it further.
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"(log rotated at {size} bytes: the earlier lines are in {backup.name})\n".encode())


@dataclass
class _Kind:
    since: float
    example: str  # the first message of the window, as logged
    count: int = 1
    dropped: int = 0


class RepeatLimiter(logging.Filter):
    """Lets through REPEAT_BURST warnings or errors of a kind per REPEAT_WINDOW_S; counts the rest."""

    def __init__(self, burst: int = REPEAT_BURST, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._kinds: dict[tuple[str, int, str, str], _Kind] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True to log the record; a record after dropped ones says how many were dropped."""
        if record.levelno < logging.WARNING:
            return True
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, str(record.msg), exc_type)
        now = time.monotonic()
        kind = self._kinds.get(key)
        if kind is None or now - kind.since >= self.window_s:
            dropped = kind.dropped if kind else 0
            self._forget_old(now)
            self._kinds[key] = _Kind(now, record.getMessage())
            if dropped:
                note = f"{dropped} more like this in the last {self.window_s:g} s were not logged"
                record.msg, record.args = f"{record.getMessage()} ({note})", None
            return True
        if kind.count < self.burst:
            kind.count += 1
            return True
        kind.dropped += 1
        return False

    def take_dropped(self) -> list[str]:
        """A line per kind with dropped records not reported yet; they count as reported now."""
        lines = []
        for kind in self._kinds.values():
            if kind.dropped:
                lines.append(f"{kind.dropped} more like '{kind.example}' were not logged")
                kind.dropped = 0
        return lines

    def _forget_old(self, now: float) -> None:
        # Kinds are message templates, so there are few; this bounds a flood of one-off messages.
        if len(self._kinds) >= _MAX_KINDS:
            self._kinds = {k: v for k, v in self._kinds.items() if now - v.since < self.window_s}
        if len(self._kinds) >= _MAX_KINDS:
            self._kinds.clear()


class CappedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records to stderr, then keeps the capped output files within their size."""

    def __init__(self, caps: list[OutputCap]) -> None:
        super().__init__(sys.stderr)
        self.caps = caps
        self.limiter = RepeatLimiter()
        self.addFilter(self.limiter)
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record, then rotate any file that grew past its cap."""
        super().emit(record)
        for cap in self.caps:
            try:
                cap.check()
            except OSError:
                pass  # the log must never take the server down


def report_dropped() -> None:
    """Log what the rate limit dropped and has not reported yet (at shutdown, when no record follows)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, CappedStreamHandler):
            for line in handler.limiter.take_dropped():
                log.info(line)


def configure_logging(level: str, outputs: tuple[Path, Path] | None, max_bytes: int) -> CappedStreamHandler:
    """Send every log record (uvicorn's too) through one handler on stderr.

    `outputs` are the files a supervisor points stdout and stderr at (None when run by hand); each
    is capped at `max_bytes` if the descriptor is that file.
    """
    caps: list[OutputCap] = []
    if outputs is not None:
        for fd, path in zip((1, 2), outputs):
            cap = OutputCap.of(fd, path, max_bytes)
            if cap is not None:
                caps.append(cap)
    handler = CappedStreamHandler(caps)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
