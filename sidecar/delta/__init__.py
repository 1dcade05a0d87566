"""δ-mem for mlx-lm models: `attach_delta_mem(model, adapter_dir)` and `delta_states(model, cache)`.

The names are loaded on first use so that light importers (the installer's adapter checks) do not
pay for importing MLX and mlx-lm.
"""

from __future__ import annotations

from typing import Any

__all__ = ["attach_delta_mem", "delta_states"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sidecar.delta import api

        return getattr(api, name)
    raise AttributeError(f"module 'sidecar.delta' has no attribute {name!r}")
