"""`delta-mem-mlx serve`: run the sidecar (uvicorn) from flags or from an install root's settings."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn

from common.settings import SettingsError, SidecarSettings, load_settings
from installer.commands.options import RootOption, examples, resolve_root
from installer.errors import cli_errors

# In-flight streams get this long to finish after SIGTERM before uvicorn cancels them.
GRACEFUL_SHUTDOWN_S = 10

LOG_LEVELS = ("debug", "info", "warning", "error")
API_KEY_ENV = "DELTA_MEM_MLX_API_KEY"


def serve(
    root: RootOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory (MLX/HF format).", show_default=False)
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="δ-mem adapter directory.", show_default=False)
    ] = None,
    no_adapter: Annotated[bool, typer.Option("--no-adapter", help="Serve the plain model, no δ-mem.")] = False,
    model_id: Annotated[str | None, typer.Option("--model-id", help="The model id clients ask for.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind. Default 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port. Default 8765.")] = None,
    context_window: Annotated[int | None, typer.Option("--context-window", help="Tokens per session.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Where session δ-states are kept.", show_default=False)
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar=API_KEY_ENV,
            help=f"Require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV}, which `ps` does not show).",
            show_default=False,
        ),
    ] = None,
    max_sessions: Annotated[int | None, typer.Option("--max-sessions", help="Sessions kept in memory.")] = None,
    max_kv_bytes: Annotated[int | None, typer.Option("--max-kv-bytes", help="KV cache bytes in all.")] = None,
    attention_state_source: Annotated[
        str | None, typer.Option("--attention-state-source", help="Hidden memory: request, qmd or none.")
    ] = None,
    qmd_bin: Annotated[str | None, typer.Option("--qmd-bin", help="The qmd executable.")] = None,
    qmd_mode: Annotated[str | None, typer.Option("--qmd-mode", help="vsearch, search or query.")] = None,
    qmd_limit: Annotated[int | None, typer.Option("--qmd-limit", help="Snippets per lookup.")] = None,
    qmd_timeout: Annotated[float | None, typer.Option("--qmd-timeout", help="Seconds per lookup.")] = None,
    qmd_collection: Annotated[str | None, typer.Option("--qmd-collection", help="QMD collection.")] = None,
    write_policy: Annotated[
        str | None, typer.Option("--write-policy", help="Tokens written to δ-state: all or skip-system.")
    ] = None,
    prefix_cache: Annotated[
        bool | None,
        typer.Option(
            "--prefix-cache/--no-prefix-cache",
            help="Share the KV and δ-state of a common system prompt across sessions.",
            show_default=False,
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch", help="Requests decoded together, one token each per step (1: one at a time). Default 8."
        ),
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option("--prefill-chunk", help="Prompt tokens prefilled per step between two decode steps. Default 512."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the sidecar in the foreground until SIGTERM or Ctrl-C."""
    if adapter is not None and no_adapter:
        raise SettingsError("give either --adapter PATH or --no-adapter, not both")
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    flags = _given(
        model_path=_absolute(model),
        model_id=model_id,
        host=host,
        port=port,
        context_window=context_window,
        state_dir=_absolute(state_dir),
        api_key=api_key,
        max_sessions=max_sessions,
        max_kv_bytes=max_kv_bytes,
        attention_state_source=attention_state_source,
        write_policy=write_policy,
        prefix_cache=prefix_cache,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
    )
    if no_adapter or adapter is not None:
        flags["adapter_path"] = _absolute(adapter)
    qmd_flags = _given(bin=qmd_bin, mode=qmd_mode, limit=qmd_limit, timeout=qmd_timeout, collection=qmd_collection)
    if root is None and "model_path" not in flags:
        root = resolve_root(None)
    settings = build_settings(root, flags, qmd_flags)
    check_paths(settings)
    _run(settings, log_level)


def build_settings(root: Path | None, flags: dict[str, Any], qmd_flags: dict[str, Any]) -> SidecarSettings:
    """Settings from the root's file (if any) with the flags given on top, validated.

    `flags` and `qmd_flags` hold only what the command line set (`adapter_path` may be None:
    --no-adapter).
    """
    flags = dict(flags)
    if root is not None:
        settings = load_settings(root.expanduser())
    else:
        missing = [flag for flag, name in (("--model", "model_path"), ("--model-id", "model_id")) if name not in flags]
        if "adapter_path" not in flags:
            missing.append("--adapter PATH or --no-adapter")
        if missing:
            raise SettingsError(f"serve needs {', '.join(missing)} (or --root ROOT of an installed sidecar)")
        settings = SidecarSettings(model_path=flags.pop("model_path"), model_id=flags.pop("model_id"))
    settings = dataclasses.replace(settings, **flags, qmd=dataclasses.replace(settings.qmd, **qmd_flags))
    settings.validate()
    return settings


def check_paths(settings: SidecarSettings) -> None:
    """Fail before starting the server when the model or adapter directory is missing."""
    for what, path in (("model", settings.model_path), ("adapter", settings.adapter_path)):
        if path is not None and not Path(path).is_dir():
            raise SettingsError(f"the {what} directory {path} does not exist: download it first or fix the path")


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().absolute()) if path is not None else None


def _run(settings: SidecarSettings, log_level: str) -> None:
    # Imported here so that `delta-mem-mlx --help` does not load FastAPI.
    from sidecar.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def register(app: typer.Typer) -> None:
    """Add `serve` to the CLI."""
    app.command(
        "serve",
        epilog=examples(
            "delta-mem-mlx serve --root ~/delta-mem",
            "delta-mem-mlx serve --model ./Qwen3-4B-4bit --adapter ./adapter --model-id delta-mem-qwen3-4b-mlx",
            "delta-mem-mlx serve --model ./model --no-adapter --model-id plain --host 0.0.0.0 --api-key SECRET",
        ),
    )(cli_errors(serve))
