"""`delta-mem-mlx selftest`: the whole flow, offline, on a generated tiny model, in a temporary root."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from common.health import base_url
from common.ports import free_port
from common.settings import DEFAULT_HOST, SidecarSettings
from installer.commands.options import examples
from installer.errors import cli_errors
from installer.sidecar_client import ChatReply, Message, SidecarClient, SidecarError
from supervisors import make_supervisor, tail_lines

SELFTEST_MODEL_ID = "delta-mem-tiny-selftest"
SELFTEST_SNIPPET = "The user's cat is called Miso and is afraid of the vacuum cleaner."
CHAT_TIMEOUT_S = 300.0


class SelftestFailed(RuntimeError):
    """A selftest step whose result was wrong."""


def stream_chat(settings: SidecarSettings, prompt: str, snippets: list[str]) -> ChatReply:
    """Stream one chat that carries `attention_state`; the client checks the SSE framing on the way."""
    client = SidecarClient(base_url(settings), settings.api_key, settings.model_id, CHAT_TIMEOUT_S)
    return client.chat([Message("user", prompt)], "selftest", True, 24, 0, attention_state=snippets)


def provider_block(root: Path) -> dict[str, Any]:
    """The OpenClaw provider config patch the plugin's tool builds for this root."""
    from plugin_tools.provider_config import build_provider_config

    payload = build_provider_config({"sidecarRoot": str(root)}, {})
    return dict(payload["config_patch"])


@cli_errors
def selftest(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary root (to look at it) instead of deleting it.")
    ] = False,
    health_timeout: Annotated[float, typer.Option(help="Seconds to wait for the sidecar to load.")] = 300.0,
) -> None:
    """Check everything offline: tiny model + adapter → install (custom) → start → streamed chat → stop.

    Generates a tiny Qwen3-shaped model and δ-mem adapter in a temporary folder, installs them as a
    `custom` preset (local paths, nothing downloaded), starts the sidecar as a background process,
    streams one chat that carries hidden memory (`attention_state`), prints the answer, the
    X-Delta-* response headers and the OpenClaw provider block, then stops and cleans up.
    Exits 0 only if every step worked.
    """
    # Imported here: they pull in MLX, tokenizers and the Hub client, which --help does not need.
    from installer.installation import InstallRequest, install
    from presets.catalog import load_preset, with_overrides
    from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="delta-mem-mlx-selftest-"))
    root = workdir / "root"
    supervisor = make_supervisor("process", root)
    passed = False
    try:
        model_dir = write_tiny_model(workdir / "source" / "model")
        adapter_dir = write_tiny_adapter(workdir / "source" / "adapter", model_dir)
        typer.echo(f"1. Generated a tiny model and δ-mem adapter in {workdir / 'source'}")
        preset = with_overrides(
            load_preset("custom"),
            model_path=model_dir,
            adapter_path=adapter_dir,
            model_id=SELFTEST_MODEL_ID,
            min_memory_gb=1,
        )
        request = InstallRequest(
            root=root,
            preset=preset,
            host=DEFAULT_HOST,
            port=free_port(),
            supervisor="process",
            assume_yes=True,
            progress=False,
            health_timeout_s=health_timeout,
        )
        typer.echo("2. Installing it as a custom preset and starting the sidecar:")
        result = install(request, echo=lambda line: typer.echo(f"   {line}"), confirm=lambda _: False)
        chat = stream_chat(result.settings, "What do you remember about my pet?", [SELFTEST_SNIPPET])
        typer.echo(f"3. Streamed chat ({chat.chunks} chunks). Answer (random tiny weights): {chat.text!r}")
        for name, value in sorted(chat.headers.items()):
            typer.echo(f"   {name}: {value}")
        if chat.snippet_count != 1:
            raise SelftestFailed(f"the sidecar reported {chat.snippet_count} memory snippets instead of 1")
        typer.echo("4. OpenClaw provider block for this sidecar:")
        typer.echo(json.dumps(provider_block(root), indent=2, ensure_ascii=False))
        supervisor.stop()
        if supervisor.status().state != "stopped":
            raise SelftestFailed(f"the sidecar did not stop: {supervisor.status().detail}")
        typer.echo("5. Stopped the sidecar.")
        passed = True
    except (SelftestFailed, SidecarError) as exc:
        typer.secho(f"Error: selftest failed: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    finally:
        if not passed:
            for line in tail_lines(supervisor.log_paths()[1], 20):
                typer.echo(f"   log: {line}", err=True)
        supervisor.uninstall()
        if keep:
            typer.echo(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    typer.echo("selftest passed.")


def register(app: typer.Typer) -> None:
    """Add the `selftest` command."""
    app.command("selftest", epilog=examples("delta-mem-mlx selftest", "delta-mem-mlx selftest --keep"))(
        selftest
    )
