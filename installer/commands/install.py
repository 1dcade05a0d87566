"""`delta-mem-mlx install-sidecar` and `install-sidecar-only`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from common.settings import DEFAULT_HOST, DEFAULT_PORT
from installer.commands.options import (
    RootOption,
    YesOption,
    duration_seconds,
    examples,
    resolve_root,
    root_flag,
)
from installer.errors import cli_errors
from supervisors import SupervisorKind, default_kind
from supervisors.readiness import DEFAULT_HEALTH_TIMEOUT_S

PresetOption = Annotated[str, typer.Option(help="Install preset (see 'delta-mem-mlx presets').")]
ModelRepoOption = Annotated[
    str | None, typer.Option(help="Hub repo of an MLX model (instead of the preset's).")
]
ModelPathOption = Annotated[Path | None, typer.Option(help="Local MLX model folder, used in place.")]
AdapterRepoOption = Annotated[str | None, typer.Option(help="Hub repo of a δ-mem adapter (.npz or .pt).")]
AdapterPathOption = Annotated[
    Path | None, typer.Option(help="Local δ-mem adapter folder (copied into the root).")
]
ModelIdOption = Annotated[
    str | None, typer.Option(help="Model id the sidecar serves (what OpenClaw asks for).")
]
MinMemoryOption = Annotated[float | None, typer.Option(help="RAM minimum in GB (for --preset custom).")]
HostOption = Annotated[str, typer.Option(help="Address to listen on (loopback unless you set an API key).")]
PortOption = Annotated[int, typer.Option(help="Port to listen on.")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        envvar="DELTA_MEM_MLX_API_KEY",
        help="Require this bearer token from clients (needed to listen beyond loopback). "
        "Kept from the previous install when not given.",
    ),
]
SupervisorOption = Annotated[
    SupervisorKind | None,
    typer.Option(
        help="How to keep the sidecar running. Default: launchd on macOS, systemd --user where "
        "it runs, else a background process. 'openclaw': nothing is installed or started; OpenClaw "
        "starts the sidecar on demand (after 'provider-config --apply') and stops it when idle."
    ),
]
HealthTimeoutOption = Annotated[
    float, typer.Option(help="Seconds to wait for the started sidecar to answer /health.")
]
KvBitsOption = Annotated[
    str | None,
    typer.Option(
        help="KV cache precision: none (float), 8 or 4 bits. Default: what the preset chooses for this "
        "machine's RAM (kept from a previous install).",
        show_default=False,
    ),
]

MaxDiskOption = Annotated[
    int | None,
    typer.Option(
        help="Disk bytes for sessions' KV kept across restarts (0: none). Default: a quarter of the free "
        "disk, at most 64 GiB (never more than a previous install's).",
        show_default=False,
    ),
]

KeepAliveOption = Annotated[
    str | None,
    typer.Option(
        help="Unload the model after this long with no request (5m, 30s, 1h, 300; never: keep it loaded). "
        "Sessions wait on disk. Default: the preset's (kept from a previous install).",
        show_default=False,
    ),
]

_EXAMPLES = examples(
    "delta-mem-mlx install-sidecar",
    "delta-mem-mlx install-sidecar --preset smoke --yes",
    "delta-mem-mlx install-sidecar --supervisor openclaw --keep-alive 10m",
    "delta-mem-mlx install-sidecar --adapter-repo ofthetrees/delta-mem-qwen3-4b-instruct-mlx-adapter",
    "delta-mem-mlx install-sidecar --preset custom --model-path ~/models/my-mlx --model-id my-model "
    "--adapter-path ~/adapters/mine --root ~/delta-mem-custom",
)


def _run(
    *,
    root: Path | None,
    preset: str,
    model_repo: str | None,
    model_path: Path | None,
    adapter_repo: str | None,
    adapter_path: Path | None,
    model_id: str | None,
    min_memory_gb: float | None,
    host: str,
    port: int,
    api_key: str | None,
    yes: bool,
    start: bool,
    supervisor: SupervisorKind | None,
    health_timeout: float,
    kv_bits: str | None,
    max_disk_bytes: int | None,
    keep_alive: str | None,
) -> None:
    # Imported here: downloads and adapter checks pull in the Hub client and numpy, which --help does not need.
    from installer.installation import InstallRequest, install
    from presets.catalog import load_preset, with_overrides

    root_path = resolve_root(root)
    chosen = with_overrides(
        load_preset(preset),
        model_repo=model_repo,
        model_path=model_path,
        adapter_repo=adapter_repo,
        adapter_path=adapter_path,
        model_id=model_id,
        min_memory_gb=min_memory_gb,
    )
    request = InstallRequest(
        root=root_path,
        preset=chosen,
        host=host,
        port=port,
        supervisor=supervisor or default_kind(),
        api_key=api_key,
        start=start,
        assume_yes=yes,
        interactive=sys.stdin.isatty(),
        progress=sys.stderr.isatty(),
        health_timeout_s=health_timeout,
        kv_bits=kv_bits,
        max_disk_bytes=max_disk_bytes,
        keep_alive_s=duration_seconds("--keep-alive", keep_alive),
    )
    install(request, echo=typer.echo, confirm=lambda question: typer.confirm(question, default=False))
    flag = root_flag(root_path)
    if request.supervisor == "openclaw":
        typer.echo(
            f"Installed for OpenClaw, not started. Next: 'delta-mem-mlx provider-config --apply{flag}': OpenClaw "
            "then starts the sidecar when an agent needs the model, and stops it when idle."
        )
    elif start:
        typer.echo(f"Next: connect OpenClaw with 'delta-mem-mlx provider-config --apply{flag}'.")
    else:
        typer.echo(f"Installed, not started. Next: 'delta-mem-mlx start-sidecar{flag}'.")


@cli_errors
def install_sidecar(
    root: RootOption = None,
    preset: PresetOption = "qwen3-delta",
    model_repo: ModelRepoOption = None,
    model_path: ModelPathOption = None,
    adapter_repo: AdapterRepoOption = None,
    adapter_path: AdapterPathOption = None,
    model_id: ModelIdOption = None,
    min_memory_gb: MinMemoryOption = None,
    host: HostOption = DEFAULT_HOST,
    port: PortOption = DEFAULT_PORT,
    api_key: ApiKeyOption = None,
    yes: YesOption = False,
    no_start: Annotated[
        bool, typer.Option("--no-start", help="Install the files only; do not start.")
    ] = False,
    supervisor: SupervisorOption = None,
    health_timeout: HealthTimeoutOption = DEFAULT_HEALTH_TIMEOUT_S,
    kv_bits: KvBitsOption = None,
    max_disk_bytes: MaxDiskOption = None,
    keep_alive: KeepAliveOption = None,
) -> None:
    """Install the sidecar: checks, a download plan, your consent, downloads, adapter, settings, start.

    Shows every file it will download with its size, asks once, then downloads into the root
    (only the needed files; a rerun reuses finished ones), converts and validates the adapter,
    writes the settings, starts the sidecar under its supervisor, waits until it is healthy and
    writes the install receipt. Without a terminal, pass --yes to agree to the plan.
    """
    _run(
        root=root,
        preset=preset,
        model_repo=model_repo,
        model_path=model_path,
        adapter_repo=adapter_repo,
        adapter_path=adapter_path,
        model_id=model_id,
        min_memory_gb=min_memory_gb,
        host=host,
        port=port,
        api_key=api_key,
        yes=yes,
        start=not no_start,
        supervisor=supervisor,
        health_timeout=health_timeout,
        kv_bits=kv_bits,
        max_disk_bytes=max_disk_bytes,
        keep_alive=keep_alive,
    )


@cli_errors
def install_sidecar_only(
    root: RootOption = None,
    preset: PresetOption = "qwen3-delta",
    model_repo: ModelRepoOption = None,
    model_path: ModelPathOption = None,
    adapter_repo: AdapterRepoOption = None,
    adapter_path: AdapterPathOption = None,
    model_id: ModelIdOption = None,
    min_memory_gb: MinMemoryOption = None,
    host: HostOption = DEFAULT_HOST,
    port: PortOption = DEFAULT_PORT,
    api_key: ApiKeyOption = None,
    yes: YesOption = False,
    supervisor: SupervisorOption = None,
    kv_bits: KvBitsOption = None,
    max_disk_bytes: MaxDiskOption = None,
    keep_alive: KeepAliveOption = None,
) -> None:
    """Install the sidecar's files and settings without starting it (install-sidecar --no-start).

    Start it later with 'delta-mem-mlx start-sidecar'.
    """
    _run(
        root=root,
        preset=preset,
        model_repo=model_repo,
        model_path=model_path,
        adapter_repo=adapter_repo,
        adapter_path=adapter_path,
        model_id=model_id,
        min_memory_gb=min_memory_gb,
        host=host,
        port=port,
        api_key=api_key,
        yes=yes,
        start=False,
        supervisor=supervisor,
        health_timeout=DEFAULT_HEALTH_TIMEOUT_S,
        kv_bits=kv_bits,
        max_disk_bytes=max_disk_bytes,
        keep_alive=keep_alive,
    )


def register(app: typer.Typer) -> None:
    """Add `install-sidecar` and `install-sidecar-only`."""
    app.command("install-sidecar", epilog=_EXAMPLES)(install_sidecar)
    app.command(
        "install-sidecar-only",
        epilog=examples(
            "delta-mem-mlx install-sidecar-only --yes",
            "delta-mem-mlx install-sidecar-only --preset smoke --root ~/delta-mem-smoke --yes",
        ),
    )(install_sidecar_only)
