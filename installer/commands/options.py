"""Option aliases and small output helpers shared by the command modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from common.durations import DurationError, parse_duration
from common.errors import UserError
from common.layout import default_root


class CommandRefused(UserError, RuntimeError):
    """A command that will not act as asked; the message says why and what to do instead."""


RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Install root. Default: $DELTA_MEM_MLX_ROOT, else the user data folder.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Agree without being asked.")]


def resolve_root(root: Path | None) -> Path:
    """The root the operator chose, or the default one; always absolute."""
    return (root.expanduser() if root is not None else default_root()).absolute()


def examples(*lines: str) -> str:
    """A help epilog listing example command lines, one per paragraph."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def print_json(data: Any) -> None:
    """Print one JSON object on stdout."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def root_flag(root: Path) -> str:
    """` --root ROOT` when the root is not the default, for next-step hints."""
    return "" if root == default_root().absolute() else f" --root {root}"


def duration_seconds(flag: str, text: str | None) -> float | None:
    """A duration option's seconds (None when it was not given); a malformed one is refused, naming the flag."""
    if text is None:
        return None
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise CommandRefused(f"{flag}: {exc}") from None

