"""One command at a time changes an install root: an exclusive lock in the root's run/ folder.

The lock is an `flock` on `<root>/run/root.lock` (common/lock_files.py): released when its holder
exits, however it exits, and naming its holder, so a command that is refused can say who holds the
root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import UserError
from common.layout import RootLayout
from common.lock_files import LockHeld, take_lock, write_holder

LOCK_NAME = "root.lock"
# A lock file whose inode changed under us (a purge renamed the root away) is opened again this often.
_REOPEN_ATTEMPTS = 3


class RootBusyError(UserError, RuntimeError):
    """Another command is changing the same root right now."""

    topic = "root busy"


def lock_path(root: Path) -> Path:
    """The root's lock file (in run/, next to the process supervisor's pidfile)."""
    return RootLayout.of(root).pidfile.with_name(LOCK_NAME)


def has_install(root: Path) -> bool:
    """True when the root holds settings or a receipt: something an install wrote that a lock protects."""
    layout = RootLayout.of(root)
    return layout.settings.exists() or layout.receipt.exists()


@contextmanager
def hold_root(root: Path, command: str, *, create: bool = False) -> Iterator[None]:
    """Hold the root's lock for the block; raise RootBusyError at once when another command holds it.

    A root with nothing installed in it has nothing to protect and is not written into: the block
    runs without a lock there, unless `create` (the install) asks to create the root and lock it.
    """
    fd = _acquire(root, command, create)
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # the next reader must not mistake us for a holder
            os.close(fd)


def _acquire(root: Path, command: str, create: bool) -> int | None:
    """An open descriptor holding the root's lock, with this process written into it; None when unneeded."""
    path = lock_path(root)
    for _ in range(_REOPEN_ATTEMPTS):
        if not create and not has_install(root):
            return None  # nothing installed, or no longer (a purge moved the root away)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = take_lock(path, 0o644)
        except LockHeld as held:
            raise RootBusyError(
                f"{RootLayout.of(root).root} is being changed by {_describe(held.holder)}; nothing was done",
                hint="wait until that command has finished (or stop it) and run this one again",
            ) from None
        if _same_file(fd, path):
            write_holder(fd, command=command)
            return fd
        os.close(fd)  # the file was renamed or removed while we opened it: look at the root again
    raise RootBusyError(f"{path} keeps changing while it is being locked; nothing was done")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _describe(holder: dict | None) -> str:
    """'pid 123 (delta-mem-mlx start-sidecar, since 2026-12-01T14:00:00)', as the holder wrote it.

    The record is empty between a holder's lock and its write, and between its truncation and its
    release: then the holder cannot be named.
    """
    if holder is None:
        return "another delta-mem-mlx command that is just starting or finishing"
    return f"pid {holder['pid']} ({holder.get('command', 'a delta-mem-mlx command')}, since {holder.get('since', '?')})"
