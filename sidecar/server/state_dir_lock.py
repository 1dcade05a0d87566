"""One server per state dir: an exclusive `flock` on `<state dir>/server.lock`, held for the process's life.

Two servers on one state dir would each keep the disk cache within --max-disk-bytes counting only
their own files (together up to twice the budget) and write over each other's sessions. The kernel
drops the lock when its holder exits, however it exits, so none is ever left behind; the file stays
(removing a lock file another process may have open would let two holders lock two files, see
supervisors/root_lock.py). The holder writes who it is into the file, so a refused server names it.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime
from pathlib import Path

from common.errors import UserError

LOCK_NAME = "server.lock"


class StateDirBusyError(UserError):
    """Another server runs on the same state dir."""


def hold_state_dir(state_dir: Path, port: int) -> int:
    """Lock the state dir for this process (the returned descriptor stays open until it exits); raise
    StateDirBusyError at once when another server holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StateDirBusyError(
            f"the state dir {state_dir} is in use by {holder}",
            hint="stop that server first, or give this one another --state-dir",
        ) from None
    except BaseException:
        os.close(fd)
        raise
    record = {"pid": os.getpid(), "port": port, "since": datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    return fd


def _holder(fd: int) -> str:
    """'another server (pid 123, port 8765, since 2026-12-01T14:00:00)', as the holder wrote it."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return "another server that is just starting"
    return f"another server (pid {record['pid']}, port {record.get('port', '?')}, since {record.get('since', '?')})"
