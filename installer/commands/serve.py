"""`delta-mem-mlx serve`: run the sidecar (uvicorn) from flags or from an install root's settings.

Its exit status (common/exit_codes.py) tells a supervisor what a restart can fix: CONFIG_ERROR for a
configuration that cannot work (found before anything loads, or model files that fail to load),
PORT_IN_USE when another process holds the port, STATE_DIR_IN_USE when another server runs on the
state dir, 1 for a model that failed to load otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, ParamSpec

import typer

from common.durations import DurationError, parse_duration
from common.errors import UserError
from common.exit_codes import CONFIG_ERROR, PORT_IN_USE, STATE_DIR_IN_USE
from common.kv_budget import parse_kv_bits
from common.layout import RootLayout
from common.load_time import record_load_time
from common.settings import SettingsError, SidecarSettings, load_settings
from installer.commands.options import RootOption, examples, resolve_root
from installer.errors import describe
from sidecar.server.connection_limits import ConnectionLimits
from supervisors import LOG_MAX_BYTES

LOG_LEVELS = ("debug", "info", "warning", "error")
API_KEY_ENV = "DELTA_MEM_MLX_API_KEY"
DEFAULTS = ConnectionLimits()
SHUTDOWN_GRACE_S = 10.0

P = ParamSpec("P")


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
    max_kv_bytes: Annotated[
        int | None, typer.Option("--max-kv-bytes", help="KV cache bytes in all (sessions and shared prefixes).")
    ] = None,
    max_disk_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-disk-bytes",
            help="Disk bytes for sessions' KV kept across restarts, under the state dir (0: none).",
            show_default=False,
        ),
    ] = None,
    kv_bits: Annotated[
        str | None, typer.Option("--kv-bits", help="KV cache precision: none (float), 8 or 4 bits.", show_default=False)
    ] = None,
    kv_group_size: Annotated[
        int | None, typer.Option("--kv-group-size", help="Values per quantization group: 32, 64 or 128.")
    ] = None,
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
    share_prefix: Annotated[
        bool | None,
        typer.Option(
            "--share-prefix/--no-share-prefix",
            help="Sessions reference the shared prefix's KV (held once) instead of copying it. Default on.",
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
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Connections held at once (within the open-file limit).")
    ] = DEFAULTS.max_connections,
    header_timeout: Annotated[
        float, typer.Option("--header-timeout", help="Seconds a request's headers may take to arrive.")
    ] = DEFAULTS.header_timeout_s,
    body_timeout: Annotated[
        float, typer.Option("--body-timeout", help="Seconds a request's body may take after its headers.")
    ] = DEFAULTS.body_timeout_s,
    shutdown_grace: Annotated[
        float, typer.Option("--shutdown-grace", help="Seconds answers in flight get to finish after SIGTERM.")
    ] = SHUTDOWN_GRACE_S,
    keep_alive: Annotated[
        str | None,
        typer.Option(
            "--keep-alive",
            help="Unload the model after this long with no request (5m, 30s, 1h, 300; 0 or never: keep it). "
            "Sessions wait on disk; the next request loads it again.",
            show_default=False,
        ),
    ] = None,
    log_to_root: Annotated[
        bool,
        typer.Option(
            "--log-to-root",
            help="With --root, append stdout and stderr to the root's logs (for a sidecar OpenClaw starts).",
        ),
    ] = False,
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
        max_disk_bytes=max_disk_bytes,
        kv_group_size=kv_group_size,
        attention_state_source=attention_state_source,
        write_policy=write_policy,
        prefix_cache=prefix_cache,
        share_prefix=share_prefix,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
    )
    if no_adapter or adapter is not None:
        flags["adapter_path"] = _absolute(adapter)
    if kv_bits is not None:
        try:
            flags["kv_bits"] = parse_kv_bits(kv_bits)
        except ValueError as exc:
            raise SettingsError(f"--kv-bits: {exc}") from None
    if keep_alive is not None:
        flags["keep_alive_s"] = _duration("--keep-alive", keep_alive)
    qmd_flags = _given(bin=qmd_bin, mode=qmd_mode, limit=qmd_limit, timeout=qmd_timeout, collection=qmd_collection)
    if root is None and "model_path" not in flags:
        root = resolve_root(None)
    settings = build_settings(root, flags, qmd_flags)
    check_paths(settings)
    if max_connections < 1 or header_timeout <= 0 or body_timeout <= 0:
        raise SettingsError("--max-connections, --header-timeout and --body-timeout must be positive")
    if shutdown_grace < 0:
        raise SettingsError("--shutdown-grace cannot be negative")
    limits = ConnectionLimits(max_connections, header_timeout, body_timeout)
    layout = RootLayout.of(root) if root is not None else None
    if log_to_root:
        if layout is None:
            raise SettingsError("--log-to-root needs --root")
        redirect_output(layout)
    outputs = (layout.stdout_log, layout.stderr_log) if layout is not None else None
    on_loaded = load_time_recorder(layout.root) if layout is not None else None
    raise typer.Exit(_run(settings, log_level, limits, shutdown_grace, outputs, on_loaded))


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
    """Fail before starting the server when the model or adapter directory is missing, or when the
    state dir is not a directory the server can create and write."""
    for what, path in (("model", settings.model_path), ("adapter", settings.adapter_path)):
        if path is not None and not Path(path).is_dir():
            problem = "is not a directory" if Path(path).exists() else "does not exist"
            raise SettingsError(f"the {what} directory {path} {problem}: download it first or fix the path")
    if settings.state_dir is not None:
        check_state_dir(Path(settings.state_dir))


def check_state_dir(path: Path) -> None:
    """Create the state dir if needed and prove it writable (a file made and removed)."""
    if path.exists() and not path.is_dir():
        raise SettingsError(f"the state dir {path} is not a directory: remove that file or choose another --state-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SettingsError(
            f"the state dir {path} cannot be written ({exc.strerror}): fix its permissions or free some space"
        ) from None


def redirect_output(layout: RootLayout) -> None:
    """Append this process's stdout and stderr to the root's logs, where `logs` and `status` read them."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    for fd, path in ((1, layout.stdout_log), (2, layout.stderr_log)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.dup2(target, fd)
        finally:
            os.close(target)


def load_time_recorder(root: Path) -> Callable[[float, bool], None]:
    """Records, at the first model load, the seconds since this process started (for readyTimeoutMs)."""
    import psutil  # only when serving

    started = psutil.Process().create_time()

    def record(load_s: float, first: bool) -> None:
        if first:
            record_load_time(root, time.time() - started, load_s)

    return record


def _duration(flag: str, text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise SettingsError(f"{flag}: {exc}") from None


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().absolute()) if path is not None else None


def _run(
    settings: SidecarSettings,
    log_level: str,
    limits: ConnectionLimits,
    shutdown_grace_s: float,
    outputs: tuple[Path, Path] | None,
    on_loaded: Callable[[float, bool], None] | None,
) -> int:
    # Imported here so that `delta-mem-mlx --help` does not load FastAPI.
    from sidecar.server.http_server import PortInUseError, run_server
    from sidecar.server.state_dir_lock import StateDirBusyError

    try:
        return run_server(
            settings,
            log_level=log_level,
            limits=limits,
            shutdown_grace_s=shutdown_grace_s,
            log_outputs=outputs,
            log_max_bytes=LOG_MAX_BYTES,
            on_loaded=on_loaded,
        )
    except PortInUseError as exc:
        _fail(exc, PORT_IN_USE)
    except StateDirBusyError as exc:
        _fail(exc, STATE_DIR_IN_USE)


def _fail(error: UserError, status: int) -> NoReturn:
    typer.secho(f"Error: {describe(error)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(status) from error


def _exit_statuses(command: Callable[P, None]) -> Callable[P, None]:
    """Print a failure found before the server runs in one line, and exit CONFIG_ERROR."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except UserError as exc:
            _fail(exc, CONFIG_ERROR)

    return wrapper


def register(app: typer.Typer) -> None:
    """Add `serve` to the CLI."""
    app.command(
        "serve",
        epilog=examples(
            "delta-mem-mlx serve --root ~/delta-mem",
            "delta-mem-mlx serve --model ./Qwen3-4B-4bit --adapter ./adapter --model-id delta-mem-qwen3-4b-mlx",
            "delta-mem-mlx serve --model ./model --no-adapter --model-id plain --host 0.0.0.0 --api-key SECRET",
            "delta-mem-mlx serve --root ~/delta-mem --keep-alive 5m",
        ),
    )(_exit_statuses(serve))
