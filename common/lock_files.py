"""Exclusive `flock` files that name their holder: taken at once or refused, never left behind.

The kernel drops an flock when its holder exits, however it exits, so no lock outlives its holder;
the file itself stays (removing a lock file another process may have open would let two holders
lock two different files). The holder writes who it is into the file, so a refused process can
name it.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any


class LockHeld(Exception):
    """Another process holds the lock; `holder` is the record it wrote (None while it has none)."""

    def __init__(self, holder: dict[str, Any] | None) -> None:
        super().__init__(f"held by {holder}")
        self.holder = holder


def take_lock(path: Path, mode: int, *, follow_links: bool = True) -> int:
    """An open descriptor holding an exclusive flock on `path` (created when missing); raises LockHeld
    at once when another process holds it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(fd)
        os.close(fd)
        raise LockHeld(holder) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_holder(fd: int, **fields: Any) -> None:
    """Write this process into the lock's file: its pid, the caller's fields, and since when."""
    record = {"pid": os.getpid(), **fields, "since": datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)


def read_holder(fd: int) -> dict[str, Any] | None:
    """The holder's record, or None between a holder's lock and its write (or after its truncation)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None
