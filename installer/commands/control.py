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

from common.health import Health, base_url
from common.layout import RootLayout
from common.receipt import require_installed
from common.settings import (
    AttentionStateSource,
    QmdMode,
    SidecarSettings,
    load_settings,
    save_settings,
)
from installer.checks import check_qmd
from installer.commands.options import (
    CommandRefused,
    JsonOption,
    RootOption,
    YesOption,
    examples,
    print_json,
    resolve_root,
    root_flag,
)
from installer.errors import cli_errors
from installer.installation import DEFAULT_HEALTH_TIMEOUT_S
from plugin_tools.status import build_status
from supervisors import Supervisor, sidecar_command, supervisor_for_root, tail_lines
from supervisors.readiness import wait_until_healthy

FOLLOW_POLL_S = 0.5

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
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this terminal instead of under the supervisor.")
    ] = False,
    health_timeout: HealthTimeoutOption = DEFAULT_HEALTH_TIMEOUT_S,
) -> None:
    """Start the installed sidecar under its supervisor and wait until it is healthy.

    Refuses, naming what is missing, when the root has no completed install or its files changed.
    The QMD and batching options are saved in the root's settings; a running sidecar is restarted
    to apply them.
    """
    root_path = resolve_root(root)
    require_installed(root_path)
    settings = load_settings(root_path)
    updated = _with_flags(
        settings,
        attention_state_source=attention_state_source,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
        qmd=dict(mode=qmd_mode, limit=qmd_limit, timeout=qmd_timeout, bin=qmd_bin, collection=qmd_collection),
    )
    if updated.attention_state_source == "qmd":
        updated = _with_resolved_qmd(updated)
    changed = updated != settings
    if changed:
        save_settings(root_path, updated)
        typer.echo(f"Settings updated: {RootLayout.of(root_path).settings}")
    if foreground:
        raise typer.Exit(subprocess.call(sidecar_command(root_path)))
    supervisor = supervisor_for_root(root_path)
    running = supervisor.status().state == "running"
    if running and not changed:
        typer.echo(f"Already running ({supervisor.status().detail}).")
    else:
        supervisor.install()
        (supervisor.restart if running else supervisor.start)()
    health = wait_until_healthy(updated, supervisor, health_timeout)
    _echo_ready(updated, health, supervisor)


@cli_errors
def stop_sidecar(root: RootOption = None) -> None:
    """Stop the sidecar; it stays stopped (also across logins) until start-sidecar."""
    supervisor = supervisor_for_root(resolve_root(root))
    supervisor.stop()
    typer.echo(f"Stopped ({supervisor.status().detail}).")


@cli_errors
def restart_sidecar(
    root: RootOption = None, health_timeout: HealthTimeoutOption = DEFAULT_HEALTH_TIMEOUT_S
) -> None:
    """Restart the sidecar (picking up changed settings) and wait until it is healthy."""
    root_path = resolve_root(root)
    require_installed(root_path)
    settings = load_settings(root_path)
    supervisor = supervisor_for_root(root_path)
    supervisor.install()
    supervisor.restart()
    health = wait_until_healthy(settings, supervisor, health_timeout)
    _echo_ready(settings, health, supervisor)


@cli_errors
def status(root: RootOption = None, json_output: JsonOption = False) -> None:
    """Show the install, the supervisor state and pid, health, model, adapter and uptime.

    The report is the plugin's `delta_mem_mlx_status` payload; --json prints it as is.
    """
    root_path = resolve_root(root)
    report = build_status({"sidecarRoot": str(root_path)})
    if json_output:
        print_json(report)
        return
    install, supervisor, health = report["install"], report["supervisor"], report["health"]
    typer.echo(f"root        {root_path}")
    typer.echo(f"install     {'complete' if install['installed'] else (install['problems'] or ['incomplete'])[0]}")
    typer.echo(f"supervisor  {supervisor['kind']}: {supervisor['state']} ({supervisor['detail']})")
    typer.echo(f"health      {health['url']}: {'ready' if health['problem'] is None else health['problem']}")
    typer.echo(f"model       {install['model_id'] or '-'}")
    typer.echo(f"adapter     {install['adapter_path'] or 'none'}")
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
    """Stop the sidecar and remove its supervision; with --purge, delete the root after confirmation."""
    root_path = resolve_root(root)
    supervisor_for_root(root_path).uninstall()
    typer.echo(f"Supervision removed for {root_path}.")
    if not purge:
        return
    layout = RootLayout.of(root_path)
    if not root_path.exists():
        typer.echo(f"{root_path} does not exist; nothing to delete.")
        return
    if not (layout.receipt.exists() or layout.settings.exists()):
        raise CommandRefused(
            f"{root_path} has no {layout.receipt.name} or {layout.settings.name}: it does not look like "
            "an install root, so it was not deleted"
        )
    if not yes:
        if not sys.stdin.isatty():
            raise CommandRefused(f"no terminal to confirm deleting {root_path}: pass --yes to delete it")
        typer.confirm(f"Delete {root_path} and everything in it?", default=False, abort=True)
    shutil.rmtree(root_path)
    typer.echo(f"Deleted {root_path}.")


def _with_flags(settings: SidecarSettings, *, qmd: dict[str, Any], **options: Any) -> SidecarSettings:
    """The settings with the options given on the command line put in (None: not given)."""
    given = {k: v for k, v in options.items() if v is not None}
    qmd_given = {k: v for k, v in qmd.items() if v is not None}
    return dataclasses.replace(settings, **given, qmd=dataclasses.replace(settings.qmd, **qmd_given))


def _with_resolved_qmd(settings: SidecarSettings) -> SidecarSettings:
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
