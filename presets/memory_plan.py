"""The memory settings a sidecar gets on this machine: KV precision, KV budget and announced window.

`install-sidecar` writes them into sidecar.json, `start-sidecar --kv-bits` recomputes the window,
`doctor`, `status` and `provider-config` show them; the arithmetic is common/kv_budget.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from common.kv_budget import (
    MIB,
    Budget,
    KvShape,
    context_window_for,
    human_gib,
    kv_bits_name,
    kv_budget,
    model_weight_bytes,
    sessions_report,
)
from presets.catalog import Preset


@dataclass(frozen=True)
class MemoryPlan:
    """What this machine gives the KV cache, and what the sidecar does with it."""

    budget: Budget
    shape: KvShape
    kv_bits: int | None
    kv_group_size: int
    context_window: int

    def report(self, configured_budget: int | None = None) -> dict[str, Any]:
        """The JSON form shown by doctor and status: the formula's terms and OpenClaw sessions per precision."""
        budget = self.budget.kv_bytes if configured_budget is None else configured_budget
        return {
            "formula": self.budget.to_dict(),
            "kv_budget_bytes": budget,
            "kv_bits": kv_bits_name(self.kv_bits),
            "kv_group_size": self.kv_group_size,
            "context_window": self.context_window,
            "openclaw_sessions": sessions_report(budget, self.shape, self.kv_group_size),
        }


def describe_memory(report: dict[str, Any]) -> str:
    """One line for people: the budget, the precision, OpenClaw sessions per precision (the system prompt
    shared, and copied per session), the window."""
    names = {"none": "float", "8": "8-bit", "4": "4-bit"}
    rows = {names[name]: row for name, row in report["openclaw_sessions"].items()}
    chosen = names[report["kv_bits"]]
    others = ", ".join(f"{name} {row['sessions']}" for name, row in rows.items() if name != chosen)
    return (
        f"KV budget {human_gib(report['kv_budget_bytes'])}, {chosen} KV: {rows[chosen]['sessions']} OpenClaw-sized "
        f"sessions with the system prompt shared ({rows[chosen]['sessions_without_sharing']} copying it; {others}); "
        f"context window {report['context_window']}"
    )


def describe_disk_cache(budget_bytes: int, used_bytes: int | None = None) -> str:
    """One line for people: the disk cache's budget (and what a running sidecar uses of it)."""
    if budget_bytes == 0:
        return "off (--max-disk-bytes 0): a restarted session replays its history"
    used = "" if used_bytes is None else f", {used_bytes / MIB:.1f} MiB used"
    return f"{human_gib(budget_bytes)} for sessions' KV across restarts{used}"


def quantization_problem(shape: KvShape, kv_bits: int | None, kv_group_size: int) -> str | None:
    """Why mlx-lm cannot quantize this model's K/V so (a group must divide head_dim), or None."""
    if kv_bits is not None and shape.head_dim % kv_group_size:
        return f"this model's head_dim {shape.head_dim} is not a multiple of the KV group size {kv_group_size}"
    return None


def machine_ram() -> int:
    """This machine's physical RAM in bytes."""
    return int(psutil.virtual_memory().total)


def plan_memory(
    preset: Preset,
    shape: KvShape,
    weights_bytes: int,
    kv_bits: int | None,
    kv_group_size: int = 64,
    ram_bytes: int | None = None,
) -> MemoryPlan:
    """The budget for this machine (or `ram_bytes`) and the window it holds at `kv_bits`."""
    budget = kv_budget(machine_ram() if ram_bytes is None else ram_bytes, weights_bytes)
    window = announced_window(preset, shape, budget.kv_bytes, kv_bits, kv_group_size)
    return MemoryPlan(budget, shape, kv_bits, kv_group_size, window)


def preset_plan(preset: Preset) -> MemoryPlan | None:
    """The plan an install of `preset` would get on this machine, from the model shape the preset
    declares (None when it declares none, as `custom` does)."""
    if preset.kv_shape is None or preset.weights_bytes is None:
        return None
    ram = machine_ram()
    return plan_memory(preset, preset.kv_shape, preset.weights_bytes, preset.kv_bits_for(ram), ram_bytes=ram)


def announced_window(
    preset: Preset, shape: KvShape, budget_bytes: int, kv_bits: int | None, kv_group_size: int
) -> int:
    """The preset's window, doubled up to its maximum (and the model's) while a full window fits the budget."""
    ceiling = min(preset.max_context_window or preset.context_window, shape.max_positions or math.inf)
    return context_window_for(
        budget_bytes, shape, kv_bits, kv_group_size, preset.context_window, max(int(ceiling), preset.context_window)
    )


def installed_shape(model_dir: str | Path, adapter_dir: str | Path | None) -> tuple[KvShape, int] | None:
    """The installed model's KV shape and weight bytes, or None when its config cannot be read."""
    try:
        return KvShape.from_dirs(model_dir, adapter_dir), model_weight_bytes(model_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None
