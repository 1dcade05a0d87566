"""The disk cache's folders under `<state dir>/kv/`: which names are ours, removing only those, and the
start-up scan.

`sessions/<64 hex>.<delta|base>/` holds `manifest.json` and `<n>.safetensors`; `prefixes/` holds
`<32 hex>.json` and `<32 hex>.safetensors`; a write in progress is a temporary `.<name>.<random>.tmp`
beside its file (common/files.py). Nothing else under kv/ is ours: the scan and every removal leave
it alone, never follow a symbolic link (a link is logged and skipped, its target untouched), and a
folder that still holds something else stays.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.kvcache.disk_files import (
    CHUNK_SUFFIX,
    MANIFEST,
    KvFileError,
    PrefixRecord,
    is_chunk_name,
    is_prefix_id,
    read_manifest,
    read_prefix_record,
)

log = logging.getLogger("sidecar.kvcache.disk_folders")

SESSION_NAME = re.compile(r"[0-9a-f]{64}\.(delta|base)")
_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")


@dataclass(frozen=True)
class DiskLayout:
    """Where each file of the disk cache lives."""

    root: Path

    @property
    def sessions(self) -> Path:
        """The folder of session folders."""
        return self.root / "sessions"

    @property
    def prefixes(self) -> Path:
        """The folder of shared prefixes."""
        return self.root / "prefixes"

    def session_dir(self, name: str) -> Path:
        """A session's folder (`name`: its key hash and mode)."""
        return self.sessions / name

    def prefix_file(self, prefix_id: str) -> Path:
        """A shared prefix's chunk file."""
        return self.prefixes / f"{prefix_id}{CHUNK_SUFFIX}"

    def prefix_record(self, prefix_id: str) -> Path:
        """A shared prefix's record."""
        return self.prefixes / f"{prefix_id}.json"

    def make(self) -> None:
        """Create the folders (refusing a link in place of one: its target is not ours to fill)."""
        for folder in (self.root, self.sessions, self.prefixes):
            folder.mkdir(parents=True, exist_ok=True)
            if not is_real_dir(folder):
                raise OSError(f"{folder} is not a folder of its own (a symbolic link?): the disk cache cannot use it")


def is_real_dir(path: Path) -> bool:
    """A folder, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_session_file(name: str) -> bool:
    """A name the writer gives a file in a session's folder (a temporary one included)."""
    temp = _TEMP.fullmatch(name)
    name = temp["name"] if temp else name
    return name == MANIFEST or is_chunk_name(name)


def is_prefix_file(name: str) -> bool:
    """A name the writer gives a file in prefixes/ (a temporary one included)."""
    temp = _TEMP.fullmatch(name)
    name = temp["name"] if temp else name
    stem, _, suffix = name.partition(".")
    return is_prefix_id(stem) and suffix in ("json", CHUNK_SUFFIX[1:])


def remove_session_folder(folder: Path) -> None:
    """Remove a session's files (only names the writer makes, never through a link) and its folder
    if nothing else is left in it. Raises OSError."""
    if not is_real_dir(folder):
        if folder.is_symlink():
            log.warning("disk cache: %s is a symbolic link, not ours: left alone", folder)
        return
    for path in folder.iterdir():
        if path.is_symlink() or path.is_dir() or not is_session_file(path.name):
            log.warning("disk cache: %s is not one of the disk cache's files: left alone", path)
        else:
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log.warning("disk cache: %s holds files that are not the disk cache's: the folder stays", folder)


def remove_prefix(layout: DiskLayout, prefix_id: str) -> None:
    """Remove a shared prefix's record and chunk file (never through a link). Raises OSError."""
    for path in (layout.prefix_record(prefix_id), layout.prefix_file(prefix_id)):
        if not path.is_symlink():
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SessionOnDisk:
    """A session found at start-up: when it was last used and the bytes of its files."""

    last_used: float
    nbytes: int


def scan(layout: DiskLayout) -> tuple[dict[str, SessionOnDisk], dict[str, PrefixRecord]]:
    """What earlier runs left: every valid session and shared prefix. Removes our files that nothing
    names (a write a kill interrupted) and those of records that fail their checks."""
    return _scan_sessions(layout), _scan_prefixes(layout)


def _scan_sessions(layout: DiskLayout) -> dict[str, SessionOnDisk]:
    found = {}
    for folder in layout.sessions.iterdir():
        if folder.is_symlink() or not SESSION_NAME.fullmatch(folder.name) or not is_real_dir(folder):
            log.warning("disk cache: %s is not a session folder of the disk cache: skipped", folder)
            continue
        try:
            manifest = read_manifest(folder / MANIFEST)
        except KvFileError as exc:
            log.warning("disk cache: removing session %s: %s", folder.name[:12], exc)
            _quietly(remove_session_folder, folder)
            continue
        named = {c.file for c in manifest.chunks if c.file}
        nbytes = 0
        for path in folder.iterdir():
            if path.is_symlink() or not is_session_file(path.name):
                log.warning("disk cache: %s is not one of the disk cache's files: left alone", path)
            elif path.name in named:
                nbytes += _regular_size(path)
            elif path.name != MANIFEST:
                _quietly(path.unlink, missing_ok=True)  # a write a kill interrupted, or a chunk cut away
        found[folder.name] = SessionOnDisk(manifest.last_used, nbytes)
    return found


def _scan_prefixes(layout: DiskLayout) -> dict[str, PrefixRecord]:
    found = {}
    for path in layout.prefixes.iterdir():
        stem = path.stem
        if path.is_symlink() or path.suffix != ".json" or not is_prefix_id(stem):
            continue
        try:
            record = read_prefix_record(path)
            size = _regular_size(layout.prefix_file(stem))
            if size != record.nbytes:
                raise KvFileError(f"its chunk file holds {size} bytes, not {record.nbytes}")
        except KvFileError as exc:
            log.warning("disk cache: removing shared prefix %s: %s", stem[:12], exc)
            _quietly(remove_prefix, layout, stem)
            continue
        found[stem] = record
    for path in layout.prefixes.iterdir():
        if path.is_symlink() or not is_prefix_file(path.name):
            log.warning("disk cache: %s is not one of the disk cache's files: left alone", path)
        elif path.name.startswith(".") or path.name.split(".")[0] not in found:
            _quietly(path.unlink, missing_ok=True)  # a write a kill interrupted, or a record that went bad
    return found


def _regular_size(path: Path) -> int:
    """The size of a regular file (not through a link); 0 for anything else or nothing."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _quietly(action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Clean-up that must not stop the server from starting: a failure is logged."""
    try:
        action(*args, **kwargs)
    except OSError as exc:
        log.warning("disk cache: cannot clean up at start-up: %s", exc)
