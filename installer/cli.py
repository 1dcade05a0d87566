"""The `delta-mem-mlx` command line. This module only assembles the command modules.

Each command module imports at module level only what its options and help need: whatever is heavy
(MLX, FastAPI, uvicorn, the Hub client, numpy, psutil, YAML, …) is imported inside the command, when it
runs, so that `delta-mem-mlx --help` stays fast (tests/test_import_layers.py checks).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="delta-mem-mlx",
    help="Install, run and supervise the δ-mem MLX sidecar for OpenClaw agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command module exposes register(app); add new modules to this list.
_COMMAND_MODULES: list[str] = [
    "serve",
    "doctor",
    "presets_cmd",
    "install",
    "control",
    "selftest",
    "provider_config",
    "eval_cmd",
]


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"installer.commands.{name}").register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()
