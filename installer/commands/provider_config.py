"""`delta-mem-mlx provider-config`: print the OpenClaw provider block, or merge it into openclaw.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from installer.commands.options import (
    JsonOption,
    RootOption,
    duration_seconds,
    examples,
    print_json,
    resolve_root,
)
from installer.errors import cli_errors
from plugin_tools.payloads import PluginConfig, ProviderConfigPayload

if TYPE_CHECKING:
    from installer.openclaw_config import ApplyResult

BaseUrlOption = Annotated[
    str | None,
    typer.Option("--base-url", help="Sidecar URL. Default: the installed sidecar's host and port."),
]
ModelIdOption = Annotated[
    str | None, typer.Option("--model-id", help="Model id. Default: the installed one.")
]
ContextWindowOption = Annotated[
    int | None,
    typer.Option(help="Context window announced to OpenClaw, at least 16000. Default: the installed one."),
]
MaxTokensOption = Annotated[
    int | None,
    typer.Option(help="Longest answer OpenClaw asks for, in tokens. Default: the installed limit."),
]
ApplyOption = Annotated[
    bool,
    typer.Option("--apply", help="Merge the block into OpenClaw's config (after a backup), don't print it."),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="OpenClaw config for --apply. Default: $OPENCLAW_CONFIG_PATH, else ~/.openclaw/openclaw.json.",
        show_default=False,
    ),
]
IdleStopOption = Annotated[
    str | None,
    typer.Option(
        "--idle-stop",
        help="For a root installed with --supervisor openclaw: OpenClaw stops the sidecar after this long "
        "without a request (5m, 30m, 1h; never: when OpenClaw exits). Default 30m.",
        show_default=False,
    ),
]
SetDefaultOption = Annotated[
    bool,
    typer.Option(help="With --apply, also make the model OpenClaw's default (agents.defaults.model)."),
]


@cli_errors
def provider_config(
    json_output: JsonOption = False,
    base_url: BaseUrlOption = None,
    model_id: ModelIdOption = None,
    context_window: ContextWindowOption = None,
    max_tokens: MaxTokensOption = None,
    apply: ApplyOption = False,
    config: ConfigOption = None,
    set_default: SetDefaultOption = True,
    idle_stop: IdleStopOption = None,
    root: RootOption = None,
) -> None:
    """Print the models.providers.delta-mem-mlx block for OpenClaw, or --apply it to openclaw.json.

    Values come from the installed sidecar unless given. --apply keeps every other key, saves a
    timestamped backup first, and makes the model OpenClaw's default unless --no-set-default. For a
    root installed with --supervisor openclaw the block also holds the `localService` with which
    OpenClaw starts the sidecar on demand and stops it after --idle-stop.
    """
    from installer.openclaw_config import apply_patch, openclaw_config_path
    from plugin_tools.provider_config import build_provider_config, check_params

    plugin_config: PluginConfig = {"sidecarRoot": str(resolve_root(root))}
    given: dict[str, object] = {
        "baseUrl": base_url,
        "modelId": model_id,
        "contextWindow": context_window,
        "maxTokens": max_tokens,
    }
    params = check_params({name: value for name, value in given.items() if value is not None})
    idle_stop_s = duration_seconds("--idle-stop", idle_stop)
    if not apply:
        payload = build_provider_config(plugin_config, params, idle_stop_s=idle_stop_s)
        if json_output:
            print_json(payload)
        else:
            _print_block(payload)
        return
    payload = build_provider_config(plugin_config, params, reveal_api_key=True, idle_stop_s=idle_stop_s)
    result = apply_patch(config or openclaw_config_path(), payload["config_patch"], set_default=set_default)
    if json_output:
        print_json(_apply_report(payload, result, set_default))
    else:
        _print_applied(payload, result, set_default)


def _apply_report(
    payload: ProviderConfigPayload, result: ApplyResult, set_default: bool
) -> dict[str, object]:
    return {
        "config_path": str(result.path),
        "backup": str(result.backup) if result.backup else None,
        "created": result.created,
        "comments_dropped": result.comments_dropped,
        "previous_default_model": result.previous_default,
        "default_model_set": set_default,
        "model_ref": payload["model_ref"],
        "alias": payload["alias"],
        "notes": payload["notes"],
    }


def _print_applied(payload: ProviderConfigPayload, result: ApplyResult, set_default: bool) -> None:
    typer.echo(f"{'Created' if result.created else 'Updated'} {result.path}: {payload['summary']}.")
    if set_default:
        typer.echo(f"OpenClaw's default model is now {payload['model_ref']} (alias '{payload['alias']}').")
    if result.previous_default:
        typer.echo(f"It was {result.previous_default}: set agents.defaults.model.primary back to it to undo.")
    if result.backup is not None:
        typer.echo(f"The previous file is kept as {result.backup}.")
    if result.comments_dropped:
        typer.secho(
            "Note: the file used JSON5 syntax (comments, trailing commas or unquoted keys); the rewritten "
            "file is plain JSON without them. The backup above still has them.",
            fg=typer.colors.YELLOW,
        )
    for note in payload["notes"]:
        typer.secho(f"Note: {note}", fg=typer.colors.YELLOW)
    typer.echo("Check it with: openclaw config validate")


def _print_block(payload: ProviderConfigPayload) -> None:
    typer.echo(f"# {payload['summary']} (from {payload['defaults_from']})")
    typer.echo(f"# Merge this into ~/.openclaw/openclaw.json, or run: {payload['apply_command']}")
    typer.echo(json.dumps(payload["config_patch"], indent=2, ensure_ascii=False))
    for note in payload["notes"]:
        typer.echo(f"# Note: {note}")


def register(app: typer.Typer) -> None:
    """Add `provider-config` to the CLI."""
    app.command(
        "provider-config",
        epilog=examples(
            "delta-mem-mlx provider-config",
            "delta-mem-mlx provider-config --apply",
            "delta-mem-mlx provider-config --apply --config ~/.openclaw/openclaw.json --no-set-default",
            "delta-mem-mlx provider-config --json --base-url http://127.0.0.1:8766/v1 --model-id my-model",
            "delta-mem-mlx provider-config --apply --idle-stop 1h",
        ),
    )(provider_config)
