"""Every CLI path option against hostile paths: a FIFO, a directory, a symlink loop, /dev/zero (as
itself and through a link), a read-only file, a read-only folder, and a full disk (ENOSPC injected
into every atomic write, since a small filesystem cannot be mounted everywhere).

Each cell must finish (pytest-timeout fails a hang), raise nothing uncaught, print no traceback,
exit 0 or with one `Error:` line, and leave the hostile object as it was.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability import record_figures
from typer.testing import CliRunner

import common.files
from common.ports import free_port
from installer.cli import app
from supervisors.process import ProcessSupervisor

runner = CliRunner()

KINDS = ["fifo", "directory", "symlink-loop", "dev-zero", "link-to-dev-zero", "read-only-file", "read-only-folder",
         "full-disk"]  # fmt: skip
AS_ROOT = os.geteuid() == 0
CONFIG_REFUSALS = {
    "fifo": "is a named pipe (FIFO), not a regular file, so it is not OpenClaw's config; nothing was changed",
    "directory": "is a directory, not a regular file, so it is not OpenClaw's config; nothing was changed",
    "symlink-loop": "is a loop of symbolic links; nothing was changed",
    "dev-zero": "/dev/zero is a character device, not a regular file",
    "link-to-dev-zero": "/dev/zero is a character device, not a regular file",
    "read-only-file": "is read-only (mode 0444); nothing was changed",
    "full-disk": "(No space left on device)",
}
OUTCOMES: Counter[str] = Counter()


@pytest.fixture
def tiny(tiny_model_dir: Path, tiny_adapter_dir: Path) -> dict[str, Path]:
    return {"model": tiny_model_dir, "adapter": tiny_adapter_dir}


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Path]]:
    """Makes a hostile path of a kind under tmp_path; a read-only folder is made writable again afterwards."""
    yield lambda kind: make_hostile(kind, tmp_path, monkeypatch)
    for folder in tmp_path.glob("read-only-folder"):
        folder.chmod(0o755)


def make_hostile(kind: str, base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A path of the given kind under `base`."""
    path = base / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("kept\n")
    elif kind == "symlink-loop":
        path.symlink_to(base / "loop-b")
        (base / "loop-b").symlink_to(path)
    elif kind == "dev-zero":
        return Path("/dev/zero")
    elif kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "read-only-file":
        path.write_text("{}\n")
        path.chmod(0o444)
    elif kind == "read-only-folder":
        path.mkdir()
        (path / "inside.txt").write_text("kept\n")
        path.chmod(0o555)
    elif kind == "full-disk":

        def full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), kwargs.get("dir"))

        monkeypatch.setattr(common.files.tempfile, "mkstemp", full)
    return path


def fingerprint(path: Path) -> Any:
    """What must not change: the kind of the path, the target of a link, the bytes and mode of a file."""
    if not os.path.lexists(path):
        return None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(info.st_mode):
        return ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    if stat.S_ISDIR(info.st_mode):
        # root may write into a read-only folder; what it held must still be there.
        return ("dir", stat.S_IMODE(info.st_mode), (path / "inside.txt").read_bytes())
    return ("special", stat.S_IFMT(info.st_mode))


def install_args(model: Path, adapter: Path) -> list[str]:
    # A port of its own: a cell that does start a sidecar must not take the default one.
    return ["install-sidecar-only", "--preset", "custom", "--model-path", str(model), "--adapter-path", str(adapter),
            "--model-id", "tiny", "--min-memory-gb", "1", "--supervisor", "process", "--port", str(free_port()),
            "--yes"]  # fmt: skip


def root_command(command: str, tiny: dict[str, Path]) -> list[str]:
    """The command line of one --root cell, without --root."""
    return {
        "doctor": ["doctor", "--preset", "smoke"],
        "install-sidecar-only": install_args(tiny["model"], tiny["adapter"]),
        "start-sidecar": ["start-sidecar", "--health-timeout", "5"],
        "stop-sidecar": ["stop-sidecar"],
        "restart-sidecar": ["restart-sidecar", "--health-timeout", "5"],
        "status": ["status", "--json"],
        "logs": ["logs"],
        "uninstall": ["uninstall"],
        "uninstall --purge": ["uninstall", "--purge", "--yes"],
        "provider-config": ["provider-config", "--json"],
    }[command]


ROOT_COMMANDS = ["doctor", "install-sidecar-only", "start-sidecar", "stop-sidecar", "restart-sidecar", "status",
                 "logs", "uninstall", "uninstall --purge", "provider-config"]  # fmt: skip
OTHER_OPTIONS = ["provider-config --apply --config", "install-sidecar-only --model-path",
                 "install-sidecar-only --adapter-path"]  # fmt: skip


def check_cell(args: list[str], hostile: Path | None, cell: str) -> tuple[str, str]:
    """Run one cell and check it; its outcome (ok, refused, usage error) and its output."""
    # A path that did not exist (the full disk's) has nothing to protect: a command may create it.
    before = fingerprint(hostile) if hostile is not None else None
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (cell, repr(result.exception))
    assert "Traceback" not in result.output, (cell, result.output)
    assert result.exit_code in (0, 1, 2), (cell, result.exit_code, result.output)
    if result.exit_code == 1:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        # doctor reports failed checks as its table, not as an error.
        assert len(errors) == 1 or (args[0] == "doctor" and "check(s) failed" in result.output), (cell, result.output)
    if before is not None:
        assert hostile is not None and fingerprint(hostile) == before, (cell, "the hostile path was changed")
    outcome = "ok" if result.exit_code == 0 else "refused" if result.exit_code == 1 else "usage error"
    OUTCOMES[outcome] += 1
    return outcome, result.output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ROOT_COMMANDS)
def test_root_option_with_a_hostile_path(
    command: str, kind: str, tiny: dict[str, Path], hostile: Callable[[str], Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("OPENCLAW_CONFIG_PATH", str(tmp_path / "openclaw.json"))
    root = hostile(kind)
    check_cell([*root_command(command, tiny), "--root", str(root)], root, f"{command} --root <{kind}>")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", OTHER_OPTIONS)
def test_path_option_with_a_hostile_path(
    option: str, kind: str, tiny: dict[str, Path], hostile: Callable[[str], Path], tmp_path: Path
) -> None:
    path = hostile(kind)
    root = ["--root", str(tmp_path / "root")]
    if option.startswith("provider-config"):
        args = ["provider-config", "--apply", "--config", str(path), *root]
    else:
        paths = {"--model-path": tiny["model"], "--adapter-path": tiny["adapter"], option.split()[-1]: path}
        args = [*install_args(paths["--model-path"], paths["--adapter-path"]), *root]
    outcome, output = check_cell(args, path, f"{option} <{kind}>")
    if option.startswith("provider-config") and kind != "read-only-folder":
        # Only a writable folder can take a new config; everything else is refused, saying why.
        assert outcome == "refused" and CONFIG_REFUSALS[kind] in output, (kind, output)
    if kind == "read-only-folder" and not AS_ROOT:
        assert outcome == "refused"


FIFO_INSIDE = ["sidecar.json", "receipt.json", "run/sidecar.pid.json", "run/keeper.json"]
FIFO_COMMANDS = ["status", "start-sidecar", "stop-sidecar", "uninstall --purge"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inside", FIFO_INSIDE)
@pytest.mark.parametrize("command", FIFO_COMMANDS)
def test_a_fifo_inside_a_root_blocks_no_command(
    command: str, inside: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    done = runner.invoke(app, [*install_args(tiny["model"], tiny["adapter"]), "--root", str(root)])
    assert done.exit_code == 0, done.output
    fifo = root / inside
    fifo.unlink(missing_ok=True)
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    try:
        # The root's own files may be removed or replaced by the command: only hangs and tracebacks count here.
        check_cell([*root_command(command, tiny), "--root", str(root)], None, f"{command} with {inside} a FIFO")
    finally:
        if root.exists():
            ProcessSupervisor(root).stop()  # start-sidecar may have started it (with the FIFO replaced)


def test_zz_record_the_sweep() -> None:
    """Runs last in this file: the figures of the sweep above."""
    cells = len(ROOT_COMMANDS) * len(KINDS) + len(OTHER_OPTIONS) * len(KINDS) + len(FIFO_INSIDE) * len(FIFO_COMMANDS)
    if sum(OUTCOMES.values()) != cells:
        pytest.skip("the sweep did not run in full (a subset was selected)")
    record_figures("cli_path_sweep", {"cells": cells, "kinds": KINDS, "outcomes": dict(OUTCOMES),
                                      "uncaught": 0, "tracebacks": 0, "hangs": 0, "as_root": AS_ROOT})  # fmt: skip
