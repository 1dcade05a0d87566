"""The benchmarks' generated model: bench.runtime's quick shape (or another) in float32, with a random TSW adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.runtime import QUICK, Shape


def write_quick_model(work: Path, shape: Shape = QUICK, **tokenizer: Any) -> tuple[Path, Path]:
    """Write a model of `shape` (the quick one unless told) and its adapter under `work`; `tokenizer`
    options go to write_tiny_model."""
    from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

    model_dir = write_tiny_model(
        work / "model",
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate_size,
        **tokenizer,
    )
    return model_dir, write_tiny_adapter(work / "adapter", model_dir)


def describe_model(model_dir: Path) -> dict[str, Any]:
    """The model's type, size and dtype, from its config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "torch_dtype")  # fmt: skip
    return {k: config.get(k) for k in keys}
