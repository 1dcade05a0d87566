"""Deleting an install root, and only one: `uninstall --purge` must prove the folder is one an install made.

Proof is this tool's settings file that loads and validates, or a receipt that names this very
root, and nothing at the top of the folder that an install does not put there. Anything else
(a folder that merely holds a file called `sidecar.json`, a root someone keeps other files in, a
symlink) is refused, so a mistyped --root never deletes a user's data.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.layout import RootLayout
from common.receipt import ReceiptError, load_receipt
from common.settings import SettingsError, load_settings

_SHOWN_ENTRIES = 5


def purge_refusal(root: Path) -> str | None:
    """Why `root` must not be deleted, or None when it is an install root and nothing else."""
    layout = RootLayout.of(root)
    if layout.root.is_symlink():
        return f"{layout.root} is a symbolic link: delete the folder it points to by its own path"
    if not layout.root.is_dir():
        return f"{layout.root} is not a folder"
    if not _made_by_an_install(layout):
        return (
            f"{layout.root} holds neither settings ({layout.settings.name}) this tool can read nor a "
            f"receipt ({layout.receipt.name}) naming it: it does not look like an install root"
        )
    strangers = sorted(entry.name for entry in layout.root.iterdir() if not _install_entry(layout, entry.name))
    if strangers:
        shown = ", ".join(strangers[:_SHOWN_ENTRIES]) + (" …" if len(strangers) > _SHOWN_ENTRIES else "")
        return (
            f"{layout.root} holds {len(strangers)} thing(s) an install does not make ({shown}): "
            "move them out first, or delete the folder yourself"
        )
    return None


def purge_root(root: Path) -> None:
    """Delete the root: first renamed aside (at once), so a new install never mixes with the deletion."""
    layout = RootLayout.of(root)
    doomed = layout.root.with_name(f".{layout.root.name}.deleting-{os.getpid()}")
    os.replace(layout.root, doomed)
    shutil.rmtree(doomed)


def _made_by_an_install(layout: RootLayout) -> bool:
    try:
        load_settings(layout.root)
        return True
    except SettingsError:
        pass
    try:
        receipt = load_receipt(layout.root)
    except ReceiptError:
        return False
    return receipt is not None and Path(receipt.root) == layout.root


def _install_entry(layout: RootLayout, name: str) -> bool:
    """True for what an install (and the sidecar it runs) creates at the top of a root."""
    files = (layout.settings.name, layout.receipt.name, layout.load_time.name)
    folders = (layout.models, layout.adapters, layout.state, layout.logs, layout.pidfile.parent)
    # An interrupted atomic write leaves `.<file>.<random>.tmp` behind.
    leftover = name.startswith(tuple(f".{file}." for file in files)) and name.endswith(".tmp")
    return name in files or name in {folder.name for folder in folders} or leftover
