"""One place that turns known failures into one-line messages for the CLI (exit code 1)."""

from __future__ import annotations

import errno
import functools
import os
from typing import Callable, ParamSpec, TypeVar

import typer

from bench.memory_eval.client import SidecarError
from bench.memory_eval.conversations import DatasetError
from bench.memory_eval.runner import EvalError
from installer.commands.options import CommandRefused
from installer.downloads import DownloadError
from installer.health import SidecarStartError
from installer.installation import InstallError
from installer.openclaw_config import OpenClawConfigError
from installer.presets import PresetError
from installer.receipt import NotInstalledError
from installer.supervisors import SupervisorError
from plugin_tools.provider_config import ProviderConfigError
from plugin_tools.target import TargetError
from sidecar.config import SettingsError
from sidecar.delta.adapter_files import AdapterError
from sidecar.delta.config import AdapterConfigError
from sidecar.delta.torch_archive import TorchArchiveError, UnsafeArchiveError

DEBUG_ENV = "DELTA_MEM_MLX_DEBUG"

P = ParamSpec("P")
R = TypeVar("R")


def _os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"the disk is full ({exc.filename or 'while writing'}): free some space and run the command again"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {exc.filename}. Choose a root you can write to (--root)."
    return str(exc)


# Ordered: the first matching type wins, so subclasses go before their bases.
ERROR_MESSAGES: list[tuple[type[BaseException], Callable[[BaseException], str]]] = [
    (SettingsError, str),
    (AdapterConfigError, lambda exc: f"adapter config: {exc}"),
    (OSError, _os_error),  # type: ignore[arg-type]
    (AdapterError, lambda exc: f"adapter: {exc}"),
    (UnsafeArchiveError, lambda exc: f"unsafe adapter file: {exc}"),
    (TorchArchiveError, lambda exc: f"torch file: {exc}"),
    (PresetError, lambda exc: f"preset: {exc}"),
    (InstallError, str),
    (DownloadError, str),
    (NotInstalledError, lambda exc: f"cannot start: {exc}"),
    (SidecarStartError, str),
    (SupervisorError, lambda exc: f"supervisor: {exc}"),
    (CommandRefused, str),
    (OpenClawConfigError, lambda exc: f"OpenClaw config: {exc}"),
    (ProviderConfigError, lambda exc: f"provider config: {exc}"),
    (TargetError, str),
    (DatasetError, lambda exc: f"dataset: {exc}"),
    (EvalError, lambda exc: f"eval: {exc}"),
    (SidecarError, str),
]


def describe(exc: BaseException) -> str | None:
    """The message for a known failure, or None for a bug that deserves a traceback."""
    for exc_type, render in ERROR_MESSAGES:
        if isinstance(exc, exc_type):
            return render(exc)
    return None


def cli_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a Typer command so known failures print one line and exit 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            message = describe(exc)
            if message is None or os.environ.get(DEBUG_ENV):
                raise
            typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc

    return wrapper
