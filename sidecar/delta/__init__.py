"""δ-mem for mlx-lm models: `attach_delta_mem(model, adapter_dir)` and `delta_states(model, cache)`."""

from sidecar.delta.api import attach_delta_mem, delta_states

__all__ = ["attach_delta_mem", "delta_states"]
