"""Attention over a shared prefix held once, against per-row contiguous caches. `python -m bench.shared_prefix --json`.

Sessions that start from the shared system prompt reference its K/V (sidecar/delta/
segment_attention.py). This times one Qwen3-4B attention layer's decode step for R = 1, 2, 4, 8 rows,
each with the prefix and its own tokens, float and quantized:

- `contiguous`: one buffer per row holding the prefix and its own tokens (a private copy), attended
  row by row as the batch does (mx.fast.scaled_dot_product_attention, or mlx-lm's quantized
  attention for quantized caches);
- `shared`: the sidecar's `decode_over_prefix`: the rows' queries stacked against the prefix's
  K/V once, each row's own segment apart, one softmax over both.

Ratios are contiguous time / shared time (> 1: sharing is faster), medians of alternating pairs;
the largest difference of the outputs is reported beside them. Prints one JSON object.
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
        "rows": args.rows,
        "own_tokens": args.own_tokens,
        "device": str(mx.default_device()),
    }
    for bits in (None, 8, 4):
        name = "float" if bits is None else f"{bits}-bit"
        report[name] = _measure(args, bits)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _measure(args: argparse.Namespace, bits: int | None) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from sidecar.delta.prefixed_kv import PrefixSegment
    from sidecar.delta.segment_attention import decode_over_prefix

    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    P, N, scale = args.prefix_tokens, args.own_tokens, args.head_dim**-0.5
    pack = (lambda x: x) if bits is None else (lambda x: tuple(mx.quantize(x, group_size=64, bits=bits)))  # noqa: E731
    prefix_k, prefix_v = mx.random.normal((1, Hkv, P, D)), mx.random.normal((1, Hkv, P, D))
    out: dict[str, Any] = {}
    for rows in args.rows:
        own_k = [mx.random.normal((1, Hkv, N, D)) for _ in range(rows)]
        own_v = [mx.random.normal((1, Hkv, N, D)) for _ in range(rows)]
        queries = mx.random.normal((rows, H, 1, D))
        # The per-row copies: prefix and own tokens in one buffer each, as a private cache holds them.
        copies = [
            (pack(mx.concatenate([prefix_k, k], 2)), pack(mx.concatenate([prefix_v, v], 2)))
            for k, v in zip(own_k, own_v)
        ]
        segment = PrefixSegment(pack(prefix_k), pack(prefix_v), P, None)
        own = [(pack(k), pack(v)) for k, v in zip(own_k, own_v)]
        mx.eval(queries, copies, segment.keys, segment.values, own)

        def contiguous() -> Any:
            if bits is None:
                attend = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
            else:
                # mlx-lm's quantized attention scales the queries in place: it gets a copy.
                attend = lambda q, k, v: quantized_scaled_dot_product_attention(  # noqa: E731
                    mx.array(q), k, v, scale=scale, mask=None, group_size=64, bits=bits
                )
            return mx.concatenate([attend(queries[i : i + 1], *copies[i]) for i in range(rows)])

        def shared() -> Any:
            return decode_over_prefix(queries, segment, own, scale, None if bits is None else (64, bits))

        error = float(mx.abs(shared() - contiguous()).max())
        pairs = _pairs(contiguous, shared, args.repeats)
        out[f"rows_{rows}"] = {
            "ratio": round(statistics.median(c / s for c, s in pairs), 3),
            "contiguous_ms": round(1000 * statistics.median(c for c, _ in pairs), 3),
            "shared_ms": round(1000 * statistics.median(s for _, s in pairs), 3),
            "max_abs_error": error,
        }
        _log(f"{'float' if bits is None else f'{bits}-bit'} rows {rows}: {json.dumps(out[f'rows_{rows}'])}")
    return out


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
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="sessions decoding together")
    parser.add_argument("--repeats", type=int, default=9)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
