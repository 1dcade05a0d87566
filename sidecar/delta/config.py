"""δ-mem adapter settings (`delta_mem_config.json`), with the reference defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import UserError

CONFIG_FILE = "delta_mem_config.json"

STATE_UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
WRITE_GRANULARITIES = ("token", "message_mean")
DELTA_HEADS = ("q", "k", "v", "o")
BOOLEAN_FIELDS = ("normalize_qk", "couple_lambda", "rankwise_gates", "delta_o_rmsnorm", "trainable_delta_scale")


class AdapterConfigError(UserError, ValueError):
    """A `delta_mem_config.json` this runtime cannot honour."""

    topic = "adapter config"


@dataclass(frozen=True)
class DeltaMemConfig:
    """The subset of the reference config that changes the computation."""

    rank: int = 8
    alpha: float = 16.0
    normalize_qk: bool = True
    couple_lambda: bool = True
    state_update_mode: str = "standard"
    rankwise_gates: bool = True
    num_state_heads: int = 1
    memory_write_granularity: str = "token"
    delta_heads: tuple[str, ...] = ("q", "o")
    target_layers: tuple[int, ...] = ()
    delta_o_rmsnorm: bool = False
    trainable_delta_scale: bool = False

    @property
    def scale(self) -> float:
        """The α/r factor applied to every Δ projection."""
        return self.alpha / self.rank

    @property
    def memory_dim(self) -> int:
        """Width of the concatenated reads: heads × rank."""
        return self.num_state_heads * self.rank

    @property
    def gate_dim(self) -> int:
        """Number of gate values per token: one per state row, or one per head."""
        return self.memory_dim if self.rankwise_gates else self.num_state_heads

    def targets(self, num_layers: int) -> list[int]:
        """Indices of the layers that carry δ-mem (all of them when target_layers is empty)."""
        if not self.target_layers:
            return list(range(num_layers))
        bad = [i for i in self.target_layers if not 0 <= i < num_layers]
        if bad:
            raise AdapterConfigError(
                f"target_layers {bad} do not exist in a model with {num_layers} layers"
            )
        return sorted(set(self.target_layers))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaMemConfig":
        """Read the reference config dict; unknown keys are ignored, missing keys take defaults."""
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        if "delta_heads" in known:
            known["delta_heads"] = tuple(known["delta_heads"])
        if "target_layers" in known:
            known["target_layers"] = tuple(int(i) for i in (known["target_layers"] or ()))
        config = cls(**known)
        config.check()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (reference field names)."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out["delta_heads"] = list(self.delta_heads)
        out["target_layers"] = list(self.target_layers)
        return out

    def check(self) -> None:
        """Reject settings this runtime does not implement, naming the field."""
        for name in BOOLEAN_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise AdapterConfigError(f"{name} must be true or false (got {getattr(self, name)!r})")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterConfigError(f"rank must be a positive integer (got {self.rank!r})")
        if not isinstance(self.num_state_heads, int) or self.num_state_heads < 1:
            raise AdapterConfigError(
                f"num_state_heads must be a positive integer (got {self.num_state_heads!r})"
            )
        if self.state_update_mode not in STATE_UPDATE_MODES:
            raise AdapterConfigError(
                f"state_update_mode {self.state_update_mode!r} is not one of {STATE_UPDATE_MODES}"
            )
        if self.memory_write_granularity not in WRITE_GRANULARITIES:
            raise AdapterConfigError(
                f"memory_write_granularity {self.memory_write_granularity!r} is not one of "
                f"{WRITE_GRANULARITIES}"
            )
        unknown = [h for h in self.delta_heads if h not in DELTA_HEADS]
        if unknown:
            raise AdapterConfigError(f"delta_heads {unknown} are not among {DELTA_HEADS}")
        if self.delta_o_rmsnorm:
            raise AdapterConfigError("delta_o_rmsnorm is not supported by this runtime")
        if self.trainable_delta_scale:
            raise AdapterConfigError("trainable_delta_scale is not supported by this runtime")

    @property
    def variant(self) -> str:
        """Short name of the paper variant: TSW, SSW or MSW."""
        if self.num_state_heads > 1:
            return "MSW"
        return "SSW" if self.memory_write_granularity == "message_mean" else "TSW"


def tensor_names(config: DeltaMemConfig) -> list[str]:
    """Names of the per-layer tensors this config needs (inactive δ heads excluded)."""
    names = ["memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "beta_bias"]
    if not config.couple_lambda:
        names += ["lambda_proj", "lambda_bias"]
    names += [f"delta_{h}_proj" for h in config.delta_heads]
    return names


def tensor_key(layer: int, name: str) -> str:
    """The reference key of one adapter tensor."""
    return f"model.layers.{layer}.self_attn.{name}"
