"""Running an installed sidecar: start-sidecar, stop-sidecar, restart-sidecar, status, logs, uninstall."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.errors import UserError
from common.health import Health, base_url, probe_health
from common.kv_budget import KV_GROUP_SIZES, parse_kv_bits
from common.layout import RootLayout
from common.receipt import read_receipt, require_installed
from common.settings import (
    AttentionStateSource,
    QmdMode,
    SettingsError,
    SidecarSettings,
    load_settings,
    save_settings,
)
from installer.commands.options import (
    CommandRefused,
    JsonOption,
    RootOption,
    YesOption,
    duration_seconds,
    examples,
    print_json,
    resolve_root,
    root_flag,
)
from installer.errors import cli_errors
from installer.purge import purge_refusal, purge_root
from supervisors import LastExit, Supervisor, sidecar_command, supervisor_for_root, tail_lines
from supervisors.openclaw import refuse_cli_start
from supervisors.readiness import DEFAULT_HEALTH_TIMEOUT_S, SidecarStartError, wait_until_healthy
from supervisors.root_lock import hold_root

FOLLOW_POLL_S = 0.5


class PortTakenError(UserError, RuntimeError):
    """The sidecar's port is held by another program."""


class StillServedError(UserError, RuntimeError):
    """A sidecar of this root answers although its supervisor stopped."""


HealthTimeoutOption = Annotated[
    float, typer.Option(help="Seconds to wait for the sidecar to answer /health.")
]


@cli_errors
def start_sidecar(
    root: RootOption = None,
    attention_state_source: Annotated[
        AttentionStateSource | None,
        typer.Option(help="Where hidden memory snippets come from: the request, QMD, or nowhere."),
    ] = None,
    qmd_mode: Annotated[QmdMode | None, typer.Option(help="QMD search mode.")] = None,
    qmd_limit: Annotated[int | None, typer.Option(help="Most snippets QMD returns per request.")] = None,
    qmd_timeout: Annotated[float | None, typer.Option(help="Seconds QMD may take per request.")] = None,
    qmd_bin: Annotated[str | None, typer.Option(help="The qmd binary (a name on PATH or a path).")] = None,
    qmd_collection: Annotated[str | None, typer.Option(help="QMD collection to search.")] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Requests decoded together, one token each per step (1: one at a time).")
    ] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Prompt tokens prefilled per step between two decode steps.")
    ] = None,
    share_prefix: Annotated[
        bool | None,
        typer.Option(
            "--share-prefix/--no-share-prefix",
            help="Sessions reference the shared prefix's KV (held once) instead of copying it.",
            show_default=False,
        ),
    ] = None,
    kv_bits: Annotated[
        str | None, typer.Option(help="KV cache precision: none (float), 8 or 4 bits.", show_default=False)
    ] = None,
    kv_group_size: Annotated[int | None, typer.Option(help="Values per KV quantization group: 32, 64 or 128.")] = None,
    max_disk_bytes: Annotated[
        int | None,
        typer.Option(help="Disk bytes for sessions' KV kept across restarts (0: none).", show_default=False),
    ] = None,
    keep_alive: Annotated[
        str | None,
        typer.Option(
            help="Unload the model after this long with no request (5m, 30s, 1h, 300; never: keep it loaded).",
            show_default=False,
        ),
    ] = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this terminal instead of under the supervisor.")
    ] = False,
    health_timeout: HealthTimeoutOption = DEFAULT_HEALTH_TIMEOUT_S,
) -> None:
    """Start the installed sidecar under its supervisor and wait until it is healthy.

    Refuses, naming what is missing, when the root has no completed install or its files changed,
    and names the program in the way when the sidecar's port is taken. The QMD, batching, KV and disk
    options are saved in the root's settings; a running sidecar is restarted to apply them. A new KV
    precision also sets the context window the KV budget holds at that precision. A start that fails
    stops the supervision again, so nothing keeps retrying in the background. A root installed with
    --supervisor openclaw is refused (OpenClaw starts it); its settings are still saved.
    """
    root_path = resolve_root(root)
    with hold_root(root_path, "delta-mem-mlx start-sidecar"):
        require_installed(root_path)
        settings = load_settings(root_path)
        updated = _with_flags(
            settings,
            attention_state_source=attention_state_source,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            share_prefix=share_prefix,
            qmd=dict(mode=qmd_mode, limit=qmd_limit, timeout=qmd_timeout, bin=qmd_bin, collection=qmd_collection),
        )
        if updated.attention_state_source == "qmd":
            updated = _with_resolved_qmd(updated)
        updated = _with_kv_flags(root_path, updated, kv_bits, kv_group_size)
        if max_disk_bytes is not None:
            if max_disk_bytes < 0:
                raise CommandRefused("--max-disk-bytes must be 0 (no disk cache) or positive")
            updated = dataclasses.replace(updated, max_disk_bytes=max_disk_bytes)
        keep_alive_s = duration_seconds("--keep-alive", keep_alive)
        if keep_alive_s is not None:
            updated = dataclasses.replace(updated, keep_alive_s=keep_alive_s)
        changed = updated != settings
        if changed:
            save_settings(root_path, updated)
            typer.echo(f"Settings updated: {RootLayout.of(root_path).settings}")
        if updated.context_window != settings.context_window:
            typer.echo(
                f"The context window is now {updated.context_window} tokens: run 'delta-mem-mlx provider-config "
                f"--apply{root_flag(root_path)}' so that OpenClaw knows."
            )
        if not foreground:
            supervisor = supervisor_for_root(root_path)
            if supervisor.kind == "openclaw":
                raise refuse_cli_start(root_flag(root_path))
            health = _start_and_wait(updated, supervisor, health_timeout, restart=changed)
            _echo_ready(updated, health, supervisor)
            return
    # In the foreground the sidecar runs as long as the terminal wants: it does not hold the root.
    raise typer.Exit(subprocess.call(sidecar_command(root_path)))


@cli_errors
def stop_sidecar(root: RootOption = None) -> None:
    """Stop the sidecar; it stays stopped (also across logins) until start-sidecar.

    Fails, naming the process, when a sidecar of this root still answers afterwards (one its
    supervisor did not start, such as a --foreground run).
    """
    root_path = resolve_root(root)
    with hold_root(root_path, "delta-mem-mlx stop-sidecar"):
        supervisor = supervisor_for_root(root_path)
        supervisor.stop()
        _refuse_if_still_served(root_path)
    typer.echo(f"Stopped ({supervisor.status().detail}).")


@cli_errors
def restart_sidecar(
    root: RootOption = None, health_timeout: HealthTimeoutOption = DEFAULT_HEALTH_TIMEOUT_S
) -> None:
    """Restart the sidecar (picking up changed settings) and wait until it is healthy."""
    root_path = resolve_root(root)
    with hold_root(root_path, "delta-mem-mlx restart-sidecar"):
        require_installed(root_path)
        settings = load_settings(root_path)
        supervisor = supervisor_for_root(root_path)
        if supervisor.kind == "openclaw":
            raise refuse_cli_start(root_flag(root_path))
        health = _start_and_wait(settings, supervisor, health_timeout, restart=True)
    _echo_ready(settings, health, supervisor)


@cli_errors
def status(root: RootOption = None, json_output: JsonOption = False) -> None:
    """Show the install, the supervisor state and pid, how the sidecar last exited, health, model, adapter, uptime.

    The report is the plugin's `delta_mem_mlx_status` payload; --json prints it as is.
    """
    from plugin_tools.status import build_status
    from presets.memory_plan import describe_disk_cache, describe_memory

    root_path = resolve_root(root)
    report = build_status({"sidecarRoot": str(root_path)})
    if json_output:
        print_json(report)
        return
    install, supervisor, health = report["install"], report["supervisor"], report["health"]
    typer.echo(f"root        {root_path}")
    typer.echo(f"install     {'complete' if install['installed'] else (install['problems'] or ['incomplete'])[0]}")
    typer.echo(f"supervisor  {supervisor['kind']}: {supervisor['state']} ({supervisor['detail']})")
    if supervisor["last_exit"] is not None:
        typer.echo(f"last exit   {LastExit(**supervisor['last_exit']).text()}")
    typer.echo(f"health      {health['url']}: {'ready' if health['problem'] is None else health['problem']}")
    state = (health["body"] or {}).get("model_state")
    loaded = f" ({state}: the next request loads it)" if state in ("unloaded", "unloading") else ""
    typer.echo(f"model       {install['model_id'] or '-'}{loaded}")
    typer.echo(f"adapter     {install['adapter_path'] or 'none'}")
    if report["memory"] is not None:
        typer.echo(f"memory      {describe_memory(report['memory'])}")
        used = ((health["body"] or {}).get("disk_cache") or {}).get("bytes")
        typer.echo(f"disk cache  {describe_disk_cache(report['memory']['disk_cache_bytes'], used)}")
    if supervisor["uptime_s"] is not None:
        typer.echo(f"uptime      {supervisor['uptime_s']:.0f} s")


@cli_errors
def logs(
    root: RootOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C to stop).")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="How many last lines of each log to show.")
    ] = 50,
) -> None:
    """Print the end of the sidecar's logs (stdout and stderr, under the root's logs/ folder)."""
    paths = supervisor_for_root(resolve_root(root)).log_paths()
    for path in paths:
        typer.echo(f"==> {path} <==")
        for line in tail_lines(path, lines):
            typer.echo(line)
    if follow:
        _follow(paths)


@cli_errors
def uninstall(
    root: RootOption = None,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the root: models, adapter, states, logs.")
    ] = False,
    yes: YesOption = False,
) -> None:
    """Stop the sidecar and remove its supervision; with --purge, delete the root after confirmation.

    --purge deletes only a folder an install made: one holding this tool's settings or receipt and
    nothing else than what an install puts there.
    """
    root_path = resolve_root(root)
    with hold_root(root_path, "delta-mem-mlx uninstall"):
        supervisor_for_root(root_path).uninstall()
        typer.echo(f"Supervision removed for {root_path}.")
        if not purge:
            return
        if not root_path.exists() and not root_path.is_symlink():
            typer.echo(f"{root_path} does not exist; nothing to delete.")
            return
        refusal = purge_refusal(root_path)
        if refusal is not None:
            raise CommandRefused(f"{refusal}; nothing was deleted")
        if not yes:
            if not sys.stdin.isatty():
                raise CommandRefused(f"no terminal to confirm deleting {root_path}: pass --yes to delete it")
            typer.confirm(f"Delete {root_path} and everything in it?", default=False, abort=True)
        purge_root(root_path)
    typer.echo(f"Deleted {root_path}.")


def _start_and_wait(
    settings: SidecarSettings, supervisor: Supervisor, timeout_s: float, *, restart: bool
) -> Health:
    """Start (or restart) the sidecar and wait for /health; a failed start leaves it stopped."""
    if supervisor.status().state == "running" and not restart:
        typer.echo(f"Already running ({supervisor.status().detail}).")
        return wait_until_healthy(settings, supervisor, timeout_s)
    from supervisors.port_owner import describe_listener, port_is_free  # psutil: loaded only to start

    supervisor.install()
    supervisor.stop()
    if not port_is_free(settings.host, settings.port):
        raise PortTakenError(
            f"{settings.host}:{settings.port} is taken by {describe_listener(settings.port)}, "
            "so the sidecar cannot listen there; nothing was started",
            hint="stop that program, or reinstall with another --port",
        )
    supervisor.start()
    try:
        return wait_until_healthy(settings, supervisor, timeout_s)
    except SidecarStartError as exc:
        supervisor.stop()
        raise SidecarStartError(
            f"{exc}. Its supervision is stopped again, so nothing retries it in the background", exc.hint
        ) from exc


def _refuse_if_still_served(root: Path) -> None:
    try:
        settings = load_settings(root)
    except SettingsError:
        return  # nothing installed: no address to check
    health = probe_health(settings)
    if health.body is not None and health.body.get("model") == settings.model_id:
        from supervisors.port_owner import describe_listener

        raise StillServedError(
            f"the supervisor's sidecar is stopped, but {base_url(settings)} still answers with this root's "
            f"model: {describe_listener(settings.port)} was not started by the supervisor",
            hint="stop it where it runs (Ctrl-C in its terminal) or with 'kill PID'",
        )


def _with_flags(settings: SidecarSettings, *, qmd: dict[str, Any], **options: Any) -> SidecarSettings:
    """The settings with the options given on the command line put in (None: not given)."""
    given = {k: v for k, v in options.items() if v is not None}
    qmd_given = {k: v for k, v in qmd.items() if v is not None}
    return dataclasses.replace(settings, **given, qmd=dataclasses.replace(settings.qmd, **qmd_given))


def _with_kv_flags(
    root: Path, settings: SidecarSettings, kv_bits: str | None, kv_group_size: int | None
) -> SidecarSettings:
    """The settings with a new KV precision and group size, and the window the budget holds with them."""
    if kv_bits is None and kv_group_size is None:
        return settings
    try:
        bits = settings.kv_bits if kv_bits is None else parse_kv_bits(kv_bits)
    except ValueError as exc:
        raise CommandRefused(f"--kv-bits: {exc}") from None
    # Imported here: psutil and YAML are not needed for --help.
    from presets.catalog import load_preset
    from presets.memory_plan import announced_window, installed_shape, quantization_problem

    group = kv_group_size or settings.kv_group_size
    if group not in KV_GROUP_SIZES:
        raise CommandRefused(f"--kv-group-size must be one of {', '.join(map(str, KV_GROUP_SIZES))}")
    installed = installed_shape(settings.model_path, settings.adapter_path)
    if installed is None:
        raise CommandRefused(f"cannot read the model's config.json in {settings.model_path}: reinstall")
    shape, _ = installed
    problem = quantization_problem(shape, bits, group)
    if problem is not None:
        raise CommandRefused(problem)
    receipt = read_receipt(root)
    preset = load_preset(receipt.preset if receipt is not None else "custom")
    window = announced_window(preset, shape, settings.max_kv_bytes, bits, group)
    return dataclasses.replace(settings, kv_bits=bits, kv_group_size=group, context_window=window)


def _with_resolved_qmd(settings: SidecarSettings) -> SidecarSettings:
    from installer.checks import check_qmd

    # launchd and systemd run with a minimal PATH, so the settings keep the absolute path.
    check = check_qmd(settings.qmd.bin)
    if check.state != "ok":
        raise CommandRefused(f"QMD: {check.detail}")
    found = shutil.which(settings.qmd.bin)
    return dataclasses.replace(
        settings, qmd=dataclasses.replace(settings.qmd, bin=str(Path(found or settings.qmd.bin).absolute()))
    )


def _echo_ready(settings: SidecarSettings, health: Health, supervisor: Supervisor) -> None:
    body = health.body or {}
    typer.echo(f"Healthy at {base_url(settings)} (model {body.get('model')}; {supervisor.status().detail}).")
    typer.echo(
        f"Next: 'delta-mem-mlx provider-config --apply{root_flag(supervisor.layout.root)}' connects OpenClaw."
    )


def _follow(paths: tuple[Path, ...]) -> None:
    offsets = {path: path.stat().st_size if path.exists() else 0 for path in paths}
    try:
        while True:
            for path in paths:
                size = path.stat().st_size if path.exists() else 0
                if size < offsets[path]:  # rotated or truncated: start over
                    offsets[path] = 0
                if size > offsets[path]:
                    with path.open("rb") as handle:
                        handle.seek(offsets[path])
                        chunk = handle.read(size - offsets[path])
                    offsets[path] = size
                    typer.echo(chunk.decode("utf-8", errors="replace"), nl=False)
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    """Add start-sidecar, stop-sidecar, restart-sidecar, status, logs and uninstall."""
    app.command(
        "start-sidecar",
        epilog=examples(
            "delta-mem-mlx start-sidecar",
            "delta-mem-mlx start-sidecar --root ~/delta-mem-smoke",
            "delta-mem-mlx start-sidecar --attention-state-source qmd --qmd-mode search --qmd-limit 4",
            "delta-mem-mlx start-sidecar --foreground",
            "delta-mem-mlx start-sidecar --keep-alive 10m",
        ),
    )(start_sidecar)
    app.command("stop-sidecar", epilog=examples("delta-mem-mlx stop-sidecar"))(stop_sidecar)
    app.command("restart-sidecar", epilog=examples("delta-mem-mlx restart-sidecar"))(restart_sidecar)
    app.command(
        "status",
        epilog=examples("delta-mem-mlx status", "delta-mem-mlx status --json --root ~/delta-mem-smoke"),
    )(status)
    app.command("logs", epilog=examples("delta-mem-mlx logs", "delta-mem-mlx logs -f -n 20"))(logs)
    app.command(
        "uninstall",
        epilog=examples(
            "delta-mem-mlx uninstall", "delta-mem-mlx uninstall --purge --yes --root ~/delta-mem-smoke"
        ),
    )(uninstall)
