"""How the CLI shows a failure: a UserError or a known OS failure prints one line (and a hint) and
exits 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import functools
import os
from typing import Callable, ParamSpec, TypeVar

import typer

from common.errors import UserError

DEBUG_ENV = "DELTA_MEM_MLX_DEBUG"

P = ParamSpec("P")
R = TypeVar("R")


def _os_error(exc: OSError) -> str:
    # The command that failed may not be about a root at all, so the message names the path and the
    # cause, not a remedy that fits only some commands.
    where = exc.filename if exc.filename is not None else "while reading or writing a file"
    if exc.errno == errno.ENOSPC:
        return f"the disk is full ({where}): free some space and run the command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror or 'permission denied'}: {where}. Check who may write there, or choose another path."
    return f"{exc.strerror}: {where}" if exc.strerror else str(exc)


def describe(exc: BaseException) -> str | None:
    """The message for a known failure, or None for a bug that deserves a traceback."""
    if isinstance(exc, UserError):
        return exc.describe() + (f"\nHint: {exc.hint}" if exc.hint else "")
    if isinstance(exc, OSError):
        return _os_error(exc)
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
