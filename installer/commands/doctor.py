"""`delta-mem-mlx doctor`: can this machine install and run the sidecar?"""

from __future__ import annotations

from typing import Annotated

import typer

from common.settings import DEFAULT_HOST, DEFAULT_PORT
from installer.commands.options import (
    JsonOption,
    RootOption,
    examples,
    print_json,
    resolve_root,
)
from installer.errors import cli_errors
from supervisors import supervisor_for_root


@cli_errors
def doctor(
    root: RootOption = None,
    preset: Annotated[
        str, typer.Option(help="Preset whose RAM minimum and download size to check.")
    ] = "qwen3-delta",
    host: Annotated[str, typer.Option(help="Address the sidecar will listen on.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port the sidecar will listen on.")] = DEFAULT_PORT,
    qmd_bin: Annotated[
        str | None, typer.Option(help="Check for this qmd binary (when QMD supplies memory snippets).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Check the OS, Python, MLX, RAM, the KV budget, disk, port, root and (if asked) qmd.

    The memory check shows the KV budget this machine gives the preset's model and how many
    OpenClaw-sized sessions it holds, float and quantized. The disk check reads the preset's
    download size from the Hugging Face Hub; without the Hub it reports the free space only.
    Exits 1 when a check fails.
    """
    # Imported here: the Hub client, numpy, psutil and YAML are not needed for --help.
    from installer.checks import Check, check_disk, check_kv_memory, failures, format_checks, run_checks
    from installer.downloads import DownloadError, plan_downloads
    from presets.catalog import PresetError, load_preset
    from presets.memory_plan import preset_plan

    root_path = resolve_root(root)
    chosen = load_preset(preset)
    running = root_path.exists() and supervisor_for_root(root_path).status().state == "running"
    checks = run_checks(
        root_path,
        min_memory_gb=chosen.min_memory_gb,
        host=host,
        port=port,
        qmd_bin=qmd_bin,
        port_held_by_this_root=running,
    )
    memory = preset_plan(chosen)
    if memory is not None:
        checks.insert(next(i for i, c in enumerate(checks) if c.name == "memory") + 1, check_kv_memory(memory))
    if chosen.model.is_set:
        try:
            plan = plan_downloads(chosen, root_path)
        except (DownloadError, PresetError) as exc:
            checks.append(Check("download plan", "warn", str(exc)))
        else:
            checks = [check_disk(root_path, plan.needed_bytes) if c.name == "disk" else c for c in checks]
    failed = failures(checks)
    if json_output:
        print_json(
            {
                "root": str(root_path),
                "preset": chosen.name,
                "passed": not failed,
                "checks": [c.to_dict() for c in checks],
                "memory": memory.report() if memory is not None else None,
            }
        )
    else:
        typer.echo(f"Checks for preset {chosen.name!r}, root {root_path}:")
        for line in format_checks(checks):
            typer.echo(line)
        typer.echo("All hard checks passed." if not failed else f"{len(failed)} check(s) failed.")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `doctor` command."""
    app.command(
        "doctor",
        epilog=examples(
            "delta-mem-mlx doctor",
            "delta-mem-mlx doctor --preset smoke --port 8766",
            "delta-mem-mlx doctor --qmd-bin qmd --json",
        ),
    )(doctor)
