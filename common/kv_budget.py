"""KV memory arithmetic without MLX: what a token and a session cost, and what a machine can give them.

One formula for everyone: `install-sidecar` writes the budget and the context window it derives
into sidecar.json, `doctor` and `status` show how many OpenClaw sessions a budget holds, and the
server's memory guard estimates what a request will need before it runs it.

The budget (`kv_budget`), for RAM R and model weights W (both in bytes):

    kv = min(R − reserve_os(R) − OPENCLAW_RESERVE − W − RUNTIME_RESERVE,
             gpu_limit(R) − W − RUNTIME_RESERVE)          rounded down to 256 MiB, at least 0

- reserve_os(R) = max(4 GiB, R/3): macOS, its caches and the user's other apps. A 16 GB Mac with
  a browser and an editor open uses 5–6 GB before any model is loaded.
- OPENCLAW_RESERVE = 1 GiB: OpenClaw's gateway (Node) and the tools it runs.
- RUNTIME_RESERVE = 1.5 GiB: Python, MLX, the tokenizer and the server, plus one prefill step's
  working memory (the engine keeps a quantized-cache step's attention scores under 256 MiB).
- gpu_limit(R): what Metal lets one process keep resident, macOS's recommended working set
  (2/3 of RAM up to 36 GB, 3/4 above); model and KV both live there.

The disk cache (sessions' KV kept across restarts, `disk_budget`), for F bytes free on the disk
that holds the root when installing:

    disk = min(F / 4, 64 GiB)          rounded down to 256 MiB

A quarter leaves the disk to its owner; 64 GiB holds hundreds of OpenClaw sessions at 8-bit (the
shared system prompt is stored once, ≈ 0.96 GB for Qwen3-4B, and each session adds only its own
tokens, ≈ 80 KB a token).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
# mlx-lm's KV caches grow 256 tokens at a time; a session holds whole steps.
CACHE_STEP = 256
# The δ cache keeps the state after every this many tokens (and at message starts); a trim to
# any other offset prefills again from the kept state before it, at most this many tokens back.
DELTA_RECORD_INTERVAL = 64
# The δ record's buffer grows by this many kept states at a time.
DELTA_RECORD_STEP = 64

# An OpenClaw-sized session: the system prompt and tools every session shares, then 4k tokens of its
# own. OpenClaw 2026.9.6's first request is 12,280 tokens in Qwen3's vocabulary (measured with a real
# `openclaw agent` turn and Qwen's template); its system prompt and tools, the prefix sessions share,
# are 12,059 of them (12,028 of 12,249 with this project's generated template: the first user and
# internal-context messages are the other 221, and are the session's own).
OPENCLAW_PREFIX_TOKENS = 12_059
OPENCLAW_OWN_TOKENS = 4_096
# Message starts kept by the δ record in such a session (turns × a few messages): a small margin.
OPENCLAW_MESSAGES = 64

OS_RESERVE_MIN = 4 * GIB
OS_RESERVE_FRACTION = 1 / 3
OPENCLAW_RESERVE = 1 * GIB
RUNTIME_RESERVE = GIB + GIB // 2
BUDGET_QUANTUM = 256 * MIB
DISK_FRACTION = 1 / 4
DISK_BUDGET_MAX = 64 * GIB
# `serve` without an install's settings (and settings written before the disk cache existed).
DEFAULT_MAX_DISK_BYTES = 4 * GIB


@dataclass(frozen=True)
class KvShape:
    """What one cached token costs a model: its KV layout and its δ layers."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # of K/V as computed: 2 for bfloat16/float16, 4 for float32
    delta_layers: int = 0
    delta_state_floats: int = 0  # per δ layer: state heads × rank × rank
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], adapter_config: dict[str, Any] | None = None) -> "KvShape":
        """The shape from a model's config.json (and a δ-mem adapter's config, if one is attached)."""
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        delta_layers = floats = 0
        if adapter_config is not None:
            rank = int(adapter_config.get("rank", 8))
            floats = int(adapter_config.get("num_state_heads", 1)) * rank * rank
            delta_layers = len(adapter_config.get("target_layers") or range(layers))
        max_positions = config.get("max_position_embeddings")
        return cls(
            layers=layers,
            kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=head_dim,
            dtype_bytes=_dtype_bytes(config.get("torch_dtype", "bfloat16")),
            delta_layers=delta_layers,
            delta_state_floats=floats,
            max_positions=int(max_positions) if max_positions else None,
        )

    @classmethod
    def from_dirs(cls, model_dir: str | Path, adapter_dir: str | Path | None = None) -> "KvShape":
        """The shape of an installed model (config.json) and adapter (delta_mem_config.json)."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        adapter = None
        if adapter_dir and (Path(adapter_dir) / "delta_mem_config.json").is_file():
            adapter = json.loads((Path(adapter_dir) / "delta_mem_config.json").read_text(encoding="utf-8"))
        return cls.from_config(config, adapter)


def kv_bytes_per_token(shape: KvShape, bits: int | None = None, group_size: int = 64) -> float:
    """K and V of one token in all layers: float, or mlx-lm's quantized format (packed values plus a
    scale and a bias per group, in the activations' dtype)."""
    elements = 2 * shape.layers * shape.kv_heads * shape.head_dim
    if bits is None:
        return float(elements * shape.dtype_bytes)
    return elements * bits / 8 + elements / group_size * 2 * shape.dtype_bytes


def delta_record_bytes(shape: KvShape, tokens: int, messages: int = 0) -> int:
    """The δ record of `tokens` tokens: a float32 state every DELTA_RECORD_INTERVAL tokens and one per
    message start (in whole buffer steps), and the latest."""
    kept = tokens // DELTA_RECORD_INTERVAL + messages
    states = math.ceil(kept / DELTA_RECORD_STEP) * DELTA_RECORD_STEP + 1
    return states * shape.delta_layers * shape.delta_state_floats * 4


def cache_tokens(tokens: int) -> int:
    """The tokens a cache holding `tokens` has room for (whole allocation steps)."""
    return math.ceil(tokens / CACHE_STEP) * CACHE_STEP


def session_bytes(
    shape: KvShape, tokens: int, bits: int | None = None, group_size: int = 64, messages: int = 0, shared: int = 0
) -> int:
    """What a session (or a shared-prefix snapshot) of `tokens` tokens holds itself: KV and δ record.
    A session that references a shared prefix of `shared` tokens holds K/V only for the tokens after
    it (its δ record, a private copy, covers all of them); the prefix is counted once, apart."""
    kv = cache_tokens(tokens - shared) * kv_bytes_per_token(shape, bits, group_size)
    return math.ceil(kv) + delta_record_bytes(shape, tokens, messages)


@dataclass(frozen=True)
class Budget:
    """The KV budget of a machine, with every term of the formula."""

    ram_bytes: int
    model_bytes: int
    os_reserve: int
    openclaw_reserve: int
    runtime_reserve: int
    gpu_limit: int
    kv_bytes: int

    def to_dict(self) -> dict[str, int]:
        """The JSON form used in reports."""
        return asdict(self)


def gpu_limit(ram_bytes: int) -> int:
    """macOS's recommended GPU working set: 2/3 of RAM up to 36 GB, 3/4 above."""
    return ram_bytes * 2 // 3 if ram_bytes <= 36 * GIB else ram_bytes * 3 // 4


def kv_budget(ram_bytes: int, model_bytes: int) -> Budget:
    """The KV bytes (sessions and shared prefixes together) this machine can give (module docstring)."""
    os_reserve = max(OS_RESERVE_MIN, int(ram_bytes * OS_RESERVE_FRACTION))
    by_ram = ram_bytes - os_reserve - OPENCLAW_RESERVE - model_bytes - RUNTIME_RESERVE
    by_gpu = gpu_limit(ram_bytes) - model_bytes - RUNTIME_RESERVE
    kv = max(0, min(by_ram, by_gpu)) // BUDGET_QUANTUM * BUDGET_QUANTUM
    return Budget(ram_bytes, model_bytes, os_reserve, OPENCLAW_RESERVE, RUNTIME_RESERVE, gpu_limit(ram_bytes), kv)


def openclaw_sessions(
    budget_bytes: int, shape: KvShape, bits: int | None = None, group_size: int = 64, share_prefix: bool = True
) -> int:
    """OpenClaw-sized sessions a budget holds next to one copy of the shared prefix (the system prompt):
    referencing it (`share_prefix`), or each with a private copy of it."""
    prefix = session_bytes(shape, OPENCLAW_PREFIX_TOKENS, bits, group_size)
    return max(0, (budget_bytes - prefix) // openclaw_session_bytes(shape, bits, group_size, share_prefix))


def openclaw_session_bytes(shape: KvShape, bits: int | None, group_size: int, share_prefix: bool) -> int:
    """What one OpenClaw-sized session holds itself: its own tokens (and δ record) when it references the
    shared prefix, else the prefix's copy too."""
    shared = OPENCLAW_PREFIX_TOKENS if share_prefix else 0
    tokens = OPENCLAW_PREFIX_TOKENS + OPENCLAW_OWN_TOKENS
    return session_bytes(shape, tokens, bits, group_size, OPENCLAW_MESSAGES, shared)


def sessions_report(budget_bytes: int, shape: KvShape, group_size: int = 64) -> dict[str, Any]:
    """Per KV precision: the shared prefix's bytes, what an OpenClaw-sized session holds and how many the
    budget holds, with the prefix shared (`sessions`) and with a private copy per session."""
    out: dict[str, Any] = {}
    for bits in (None, *sorted(KV_BITS, reverse=True)):
        out[kv_bits_name(bits)] = {
            "prefix_bytes": session_bytes(shape, OPENCLAW_PREFIX_TOKENS, bits, group_size),
            "bytes_per_session": openclaw_session_bytes(shape, bits, group_size, share_prefix=True),
            "sessions": openclaw_sessions(budget_bytes, shape, bits, group_size),
            "bytes_per_session_without_sharing": openclaw_session_bytes(shape, bits, group_size, share_prefix=False),
            "sessions_without_sharing": openclaw_sessions(budget_bytes, shape, bits, group_size, share_prefix=False),
        }
    return out


def context_window_for(
    budget_bytes: int, shape: KvShape, bits: int | None, group_size: int, floor: int, ceiling: int
) -> int:
    """The window to announce: the largest floor × 2^k ≤ ceiling whose full session fits the budget
    (never less than the floor)."""
    window = floor
    while window * 2 <= ceiling and session_bytes(shape, window * 2, bits, group_size) <= budget_bytes:
        window *= 2
    return window


def disk_budget(free_bytes: int) -> int:
    """The disk cache's byte budget for this much free disk (the formula above)."""
    budget = min(int(free_bytes * DISK_FRACTION), DISK_BUDGET_MAX)
    return budget // BUDGET_QUANTUM * BUDGET_QUANTUM


def kv_bits_name(bits: int | None) -> str:
    """`none`, `8` or `4`: how reports and flags name a KV precision."""
    return "none" if bits is None else str(bits)


def parse_kv_bits(value: str | int | None) -> int | None:
    """`none` (float KV), 8 or 4; raises ValueError naming the choices."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = -1
    if bits not in KV_BITS:
        raise ValueError(f"kv bits must be none, 8 or 4 (got {value!r})")
    return bits


def model_weight_bytes(model_dir: str | Path) -> int:
    """Bytes of a model's weight files (what loading it keeps in memory)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors") if p.is_file())


def human_gib(n: int | float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GIB:.2f} GiB"


def _dtype_bytes(name: Any) -> int:
    return 4 if str(name) in ("float32", "torch.float32") else 2
