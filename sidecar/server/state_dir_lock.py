"""One server per state dir: an exclusive `flock` on `<state dir>/server.lock`, held for the process's life.

Two servers on one state dir would each keep the disk cache within --max-disk-bytes counting only
their own files (together up to twice the budget) and write over each other's sessions. The kernel
drops the lock when its holder exits, however it exits (common/lock_files.py), and the holder
writes who it is into the file, so a refused server names it.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from common.lock_files import LockHeld, take_lock, write_holder

LOCK_NAME = "server.lock"


class StateDirBusyError(UserError):
    """Another server runs on the same state dir."""


def hold_state_dir(state_dir: Path, port: int) -> int:
    """Lock the state dir for this process (the returned descriptor stays open until it exits); raise
    StateDirBusyError at once when another server holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = take_lock(state_dir / LOCK_NAME, 0o600, follow_links=False)
    except LockHeld as held:
        raise StateDirBusyError(
            f"the state dir {state_dir} is in use by {_describe(held.holder)}",
            hint="stop that server first, or give this one another --state-dir",
        ) from None
    write_holder(fd, port=port)
    return fd


def _describe(holder: dict | None) -> str:
    """'another server (pid 123, port 8765, since 2026-12-01T14:00:00)', as the holder wrote it."""
    if holder is None:
        return "another server that is just starting"
    return f"another server (pid {holder['pid']}, port {holder.get('port', '?')}, since {holder.get('since', '?')})"
