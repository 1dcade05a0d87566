"""8-bit KV without the prefill penalty: `python -m bench.kv_prefill --json`.

One Qwen3-4B-shaped attention layer (32 query heads, 8 KV heads × 128, hidden 2560, bfloat16 as the
shipped 4-bit model computes), its cache filled to each context length: a 512-token prefill chunk
and one decode step, with a float cache, a quantized cache through mlx-lm's quantized attention (the
old path), and a quantized cache through `sidecar.delta.attention.attention` (the new path: float
attention over the dequantized K/V for chunks, mlx-lm's quantized attention for one token). The
three run in turn, `--repeats` times; the report has the median seconds of each and the median of
the per-round ratios float/quantized (1.0 = as fast as float), and the machine's load around the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.models.qwen3 import Attention, ModelArgs

from bench.runtime import reexec_with_openblas
from sidecar.delta.attention import PlainAttention

PATHS = ("float", "old", "new")
QWEN3_4B = dict(
    model_type="qwen3", hidden_size=2560, num_hidden_layers=1, intermediate_size=9728, num_attention_heads=32,
    rms_norm_eps=1e-6, vocab_size=151936, num_key_value_heads=8, max_position_embeddings=40960, head_dim=128,
    tie_word_embeddings=True, rope_theta=1_000_000.0,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    parser = _parser()
    args = parser.parse_args(argv)
    if "float" not in args.paths:
        parser.error("--paths needs float: every ratio is against it")
    if argv is None:
        reexec_with_openblas("bench.kv_prefill")
    mx.random.seed(0)
    layer = Attention(ModelArgs.from_dict(QWEN3_4B))
    layer.set_dtype(mx.bfloat16)
    mx.eval(layer.parameters())
    every = {"float": (layer, None), "old": (layer, args.bits), "new": (PlainAttention(layer), args.bits)}
    paths = {name: every[name] for name in PATHS if name in args.paths}
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "shape": "Qwen3-4B attention layer, bfloat16", "bits": args.bits, "chunk": args.chunk, "repeats": args.repeats,
        "paths": list(paths), "backend": str(mx.default_device()), "blas": os.environ.get("LD_PRELOAD", ""),
    }  # fmt: skip
    for context in args.contexts:
        for phase, tokens in (("prefill", args.chunk), ("decode", 1)):
            caches = {name: _filled(context, bits) for name, (_, bits) in paths.items()}
            x = mx.random.normal((1, tokens, QWEN3_4B["hidden_size"])).astype(mx.bfloat16)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for round_ in range(args.repeats):
                turn = round_ % len(paths)
                names = list(paths)[turn:] + list(paths)[:turn]  # each goes first in turn
                for name in names:
                    times[name].append(_step(paths[name][0], x, caches[name]))
                _log(f"{context} {phase} round {round_ + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in paths))
            report[f"{phase}_{context}"] = {
                **{f"{name}_s": round(statistics.median(t), 4) for name, t in times.items()},
                **{
                    f"{name}_vs_float": round(statistics.median(f / q for f, q in zip(times["float"], times[name])), 3)
                    for name in paths
                    if name != "float"
                },
            }
    report["load_before"] = [round(v, 2) for v in load_before]
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def _filled(context: int, bits: int | None) -> Any:
    """A cache holding `context` random (normalised-scale) keys and values."""
    cache = KVCache() if bits is None else QuantizedKVCache(group_size=64, bits=bits)
    shape = (1, QWEN3_4B["num_key_value_heads"], context, QWEN3_4B["head_dim"])
    keys, values = (mx.random.normal(shape).astype(mx.bfloat16) for _ in range(2))
    mx.eval(cache.update_and_fetch(keys, values))
    return cache


def _step(layer: Any, x: mx.array, cache: Any) -> float:
    """Seconds for one forward of `x` on `cache`; the cache is trimmed back to where it was."""
    mask = "causal" if x.shape[1] > 1 else None
    began = time.perf_counter()
    mx.eval(layer(x, mask=mask, cache=cache))
    elapsed = time.perf_counter() - began
    cache.trim(x.shape[1])
    return elapsed


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_prefill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 12288], help="cached tokens")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per prefill chunk")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of float, old and new")
    parser.add_argument(
        "--paths", nargs="+", choices=PATHS, default=list(PATHS), help="which to run (float is needed for ratios)"
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
