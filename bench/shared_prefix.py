"""Can sessions share the system prompt's KV instead of copying it? `python -m bench.shared_prefix --json`.

Every active session holds its own copy of the shared prefix's KV (MLX caches are contiguous
buffers). This measures one decode step's attention over [shared prefix | own tokens] for one
layer, with the prefix held once and the session's own tokens apart, against the contiguous cache
it would replace, float and quantized:

- `contiguous`: today, one buffer per session (mx.fast.scaled_dot_product_attention, or mlx-lm's
  quantized attention for quantized caches);
- `two_segment`: scores against each segment, one softmax over both, two weighted sums;
- `concat_per_step` (float only): the segments concatenated for each step (a transient copy).

Ratios are contiguous time / candidate time (≥ 0.9 keeps decode within 10 %), medians of
alternating pairs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

from bench.runtime import alternate, reexec_with_openblas


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print its JSON report."""
    args = _parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas("bench.shared_prefix")
    import mlx.core as mx

    report: dict[str, Any] = {
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        "prefix_tokens": args.prefix_tokens,
        "own_tokens": args.own_tokens,
        "device": str(mx.default_device()),
    }
    for bits in (None, 8, 4):
        name = "float" if bits is None else f"{bits}-bit"
        report[name] = _measure(args, bits)
        _log(f"{name}: {json.dumps(report[name])}")
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _measure(args: argparse.Namespace, bits: int | None) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    B, H, Hkv, D = 1, args.heads, args.kv_heads, args.head_dim
    P, N, scale = args.prefix_tokens, args.own_tokens, args.head_dim**-0.5
    keys = mx.random.normal((B, Hkv, P + N, D))
    values = mx.random.normal((B, Hkv, P + N, D))
    query = mx.random.normal((B, H, 1, D))
    prefix_k, prefix_v = keys[:, :, :P], values[:, :, :P]
    own_k, own_v = keys[:, :, P:], values[:, :, P:]
    mx.eval(keys, values, query, prefix_k, prefix_v, own_k, own_v)

    if bits is None:
        contiguous = lambda: mx.fast.scaled_dot_product_attention(query, keys, values, scale=scale, mask=None)  # noqa: E731
        candidates = {
            "two_segment": lambda: _two_segment(query, (prefix_k, prefix_v), (own_k, own_v), scale, mx.matmul),
            "concat_per_step": lambda: mx.fast.scaled_dot_product_attention(
                query, *(mx.concatenate(pair, 2) for pair in ((prefix_k, own_k), (prefix_v, own_v))), scale=scale
            ),
        }
    else:
        quantize = lambda x: mx.quantize(x, group_size=64, bits=bits)  # noqa: E731
        qk, qv, pk, pv, ok, ov = map(quantize, (keys, values, prefix_k, prefix_v, own_k, own_v))
        mx.eval(qk, qv, pk, pv, ok, ov)
        # mlx-lm's quantized attention scales the queries in place: it gets a copy each time.
        contiguous = lambda: quantized_scaled_dot_product_attention(  # noqa: E731
            mx.array(query), qk, qv, scale=scale, mask=None, group_size=64, bits=bits
        )

        def qmatmul(a: Any, packed: Any, transpose: bool = True) -> Any:
            return mx.quantized_matmul(a, *packed, transpose=transpose, group_size=64, bits=bits)

        candidates = {"two_segment": lambda: _two_segment(query, (pk, pv), (ok, ov), scale, qmatmul, quantized=True)}

    reference = contiguous()
    out: dict[str, Any] = {}
    for name, run in candidates.items():
        error = float(mx.abs(run() - reference).max())
        pairs = _pairs(contiguous, run, args.repeats)
        out[name] = {
            "ratio": round(statistics.median(c / t for c, t in pairs), 3),
            "contiguous_ms": round(1000 * statistics.median(c for c, _ in pairs), 3),
            "candidate_ms": round(1000 * statistics.median(t for _, t in pairs), 3),
            "max_abs_error": error,
        }
    return out


def _two_segment(query: Any, prefix: tuple[Any, Any], own: tuple[Any, Any], scale: float, matmul: Callable[..., Any],
                 quantized: bool = False) -> Any:  # fmt: skip
    """Attention over [prefix | own] without joining them: one softmax over both segments' scores."""
    import mlx.core as mx

    B, H, L, D = query.shape
    Hkv = (prefix[0][0] if quantized else prefix[0]).shape[1]
    q = (query * scale).reshape(B, Hkv, H // Hkv, L, D)

    def expand(x: Any) -> Any:
        return tuple(mx.expand_dims(t, 2) for t in x) if quantized else mx.expand_dims(x, 2)

    def scores(keys: Any) -> Any:
        return matmul(q, expand(keys)) if quantized else matmul(q, expand(keys).swapaxes(-1, -2))

    s1, s2 = scores(prefix[0]), scores(own[0])
    weights = mx.softmax(mx.concatenate([s1, s2], axis=-1), axis=-1, precise=True)
    w1, w2 = weights[..., : s1.shape[-1]], weights[..., s1.shape[-1] :]
    if quantized:
        out = matmul(w1, expand(prefix[1]), transpose=False) + matmul(w2, expand(own[1]), transpose=False)
    else:
        out = matmul(w1, expand(prefix[1])) + matmul(w2, expand(own[1]))
    return out.reshape(B, H, L, D)


def _pairs(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> list[tuple[float, float]]:
    """(first, second) times per call, alternating which runs first, after a warm-up of each."""
    import mlx.core as mx

    def timed(candidate: bool) -> float:
        fn = second if candidate else first
        began = time.perf_counter()
        for _ in range(8):
            mx.eval(fn())
        return (time.perf_counter() - began) / 8

    return alternate(timed, repeats)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--prefix-tokens", type=int, default=12288, help="the shared system prompt")
    parser.add_argument("--own-tokens", type=int, default=4096, help="the session's own tokens")
    parser.add_argument("--heads", type=int, default=32, help="query heads (Qwen3-4B: 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (Qwen3-4B: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="(Qwen3-4B: 128)")
    parser.add_argument("--repeats", type=int, default=15)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
