"""`delta-mem-mlx presets`: list the install presets."""

from __future__ import annotations

import typer

from installer.commands.options import JsonOption, examples, print_json
from installer.errors import cli_errors


@cli_errors
def presets(json_output: JsonOption = False) -> None:
    """List the install presets: model, served model id, minimum RAM and adapter."""
    from presets.catalog import list_presets

    found = list_presets()
    if json_output:
        print_json({"presets": [p.to_dict() for p in found]})
        return
    for preset in found:
        typer.echo(f"{preset.name}: {preset.description}")
        model = preset.model.describe() if preset.model.is_set else "--model-repo ID or --model-path DIR"
        typer.echo(f"  model      {model}")
        typer.echo(f"  model id   {preset.model_id or '--model-id ID'}")
        typer.echo(f"  min RAM    {preset.min_memory_gb:g} GB")
        more = f" (up to {preset.max_context_window} where the KV budget holds it)" if preset.max_context_window else ""
        typer.echo(f"  context    {preset.context_window} tokens{more}, up to {preset.max_output_tokens} out")
        if preset.kv_bits_by_ram:
            rows = [f"{'float' if b is None else f'{b}-bit'} from {gb:g} GB" for gb, b in preset.kv_bits_by_ram]
            typer.echo(f"  KV cache   {', '.join(rows)}")
        adapter = (
            preset.adapter.describe()
            if preset.adapter
            else "none (optional: --adapter-repo or --adapter-path)"
        )
        typer.echo(f"  adapter    {adapter}")
        for alternative in preset.adapter_alternatives:
            typer.echo(f"             or --adapter-repo {alternative}")


def register(app: typer.Typer) -> None:
    """Add the `presets` command."""
    app.command(
        "presets",
        epilog=examples("delta-mem-mlx presets", "delta-mem-mlx presets --json"),
    )(presets)
