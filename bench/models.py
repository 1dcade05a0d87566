"""The benchmarks' generated model: bench.runtime's quick shape in float32, with a random TSW adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.runtime import QUICK


def write_quick_model(work: Path, **tokenizer: Any) -> tuple[Path, Path]:
    """Write the quick-shaped model and its adapter under `work`; `tokenizer` options go to write_tiny_model."""
    from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

    model_dir = write_tiny_model(
        work / "model",
        hidden_size=QUICK.hidden_size,
        num_layers=QUICK.num_layers,
        num_heads=QUICK.num_heads,
        num_kv_heads=QUICK.num_kv_heads,
        head_dim=QUICK.head_dim,
        intermediate_size=QUICK.intermediate_size,
        **tokenizer,
    )
    return model_dir, write_tiny_adapter(work / "adapter", model_dir)


def describe_model(model_dir: Path) -> dict[str, Any]:
    """The model's type, size and dtype, from its config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "torch_dtype")  # fmt: skip
    return {k: config.get(k) for k in keys}
