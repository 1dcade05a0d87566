"""Why each row of the decode batch keeps its own cache: `python -m bench.batch_layout --json`.

On the quick benchmark model (Qwen3-shaped, hidden 512, 8 layers, float32) with 8 rows, this
compares the layout the sidecar decodes with (each row its own mlx-lm cache: projections, RoPE and
MLP batched, attention one row at a time) against mlx-lm's BatchKVCache (all rows in one buffer,
left-padded to the longest row, one attention call with a padding mask): one attention layer and
one whole decode step, alternating the two (medians), for rows of equal and of mixed lengths; and
what joining and leaving cost the padded layout (merge, extend, extract and filter each copy KV).
Plain attention on both sides (the padded layout has no δ-state); the step with δ on is reported
for the per-row layout. KV values are random: attention costs the same whatever they hold.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

from bench.runtime import QUICK, Shape, add_blas_option, alternate, build_model, reexec_with_openblas

PROFILES = {
    "equal_2k": [2048] * 8,
    "mixed_512_to_12k": [512, 1024, 2048, 3072, 4096, 6144, 8192, 12288],
}
MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print its JSON report."""
    args = _parser().parse_args(argv)
    if args.blas == "openblas":
        reexec_with_openblas("bench.batch_layout")
    import mlx.core as mx

    started = time.perf_counter()
    results = {name: measure(QUICK, lengths, args.repeats, args.seed) for name, lengths in PROFILES.items()}
    report = {
        "model": QUICK.name,
        "rows": 8,
        "profiles": results,
        "backend": {"mlx": mx.__version__, "device": str(mx.default_device()), "platform": platform.platform()},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def measure(shape: Shape, lengths: list[int], repeats: int, seed: int) -> dict[str, Any]:
    """Both layouts for rows of `lengths` tokens: step and attention times, join/leave copies, bytes."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from sidecar.delta.attention import attend_rows
    from sidecar.delta.batch import decode_rows

    plain, _ = build_model(shape, seed, delta=False)
    with_delta, _ = build_model(shape, seed)
    B = len(lengths)
    rows = [_filled(make_prompt_cache(plain), length, shape) for length in lengths]
    delta_rows = [_filled(make_prompt_cache(with_delta), length, shape) for length in lengths]
    tokens = mx.array([1] * B)

    began = time.perf_counter()
    padded = [BatchKVCache.merge([row[layer] for row in rows]) for layer in range(shape.num_layers)]
    mx.eval([c.state for c in padded])
    merge_s = time.perf_counter() - began

    def rows_step() -> None:
        _timed_eval(decode_rows(plain, tokens, rows, [False] * B), [c for row in rows for c in row])

    def padded_step() -> None:
        _timed_eval(plain(tokens[:, None], cache=padded)[:, -1], padded)

    def delta_step() -> None:
        _timed_eval(decode_rows(with_delta, tokens, delta_rows, [True] * B), [c for row in delta_rows for c in row])

    attention = plain.layers[0].self_attn
    x = mx.random.normal((B, 1, shape.hidden_size))
    offsets = mx.array(lengths)

    def rows_attention() -> None:
        _timed_eval(attend_rows(attention, x, [row[0] for row in rows], offsets, {}), [row[0] for row in rows])

    def padded_attention() -> None:
        mask = padded[0].make_mask(1)
        _timed_eval(attention(x, mask, padded[0]), padded[:1])

    step = alternate(lambda padded: _time(padded_step if padded else rows_step), repeats)
    layer = alternate(lambda padded: _time(padded_attention if padded else rows_attention), repeats * 3)
    delta_step_s = statistics.median(_time(delta_step) for _ in range(repeats))
    return {
        "lengths": lengths,
        "step_ms_rows": _ms(statistics.median(r for r, _ in step)),
        "step_ms_padded": _ms(statistics.median(p for _, p in step)),
        "step_padded_over_rows": round(statistics.median(p / r for r, p in step), 3),
        "step_ms_rows_delta": _ms(delta_step_s),
        "attention_layer_ms_rows": _ms(statistics.median(r for r, _ in layer)),
        "attention_layer_ms_padded": _ms(statistics.median(p for _, p in layer)),
        "attention_padded_over_rows": round(statistics.median(p / r for r, p in layer), 3),
        "kv_mib_rows": round(sum(c.nbytes for row in rows for c in row) / MIB, 1),
        "kv_mib_padded": round(sum(c.nbytes for c in padded) / MIB, 1),
        **_join_and_leave(padded, rows, merge_s),
    }


def _join_and_leave(padded: list[Any], rows: list[list[Any]], merge_s: float) -> dict[str, Any]:
    """What the padded layout copies when the longest row joins a batch or leaves it."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    longest = max(range(len(rows)), key=lambda i: rows[i][0].offset)
    others = [i for i in range(len(rows)) if i != longest]
    began = time.perf_counter()
    extracted = [layer.extract(longest) for layer in padded]
    mx.eval([c.state for c in extracted])
    extract_s = time.perf_counter() - began
    began = time.perf_counter()
    for layer in padded:
        layer.filter(others)
    mx.eval([c.state for c in padded])
    filter_s = time.perf_counter() - began
    joining = [BatchKVCache.merge([rows[longest][layer]]) for layer in range(len(padded))]
    mx.eval([c.state for c in joining])
    began = time.perf_counter()
    for layer, row in zip(padded, joining):
        layer.extend(row)
    mx.eval([c.state for c in padded])
    extend_s = time.perf_counter() - began
    return {
        "merge_all_ms": _ms(merge_s),
        "longest_row_mib": round(sum(c.nbytes for c in rows[longest]) / MIB, 1),
        "leave_extract_ms": _ms(extract_s),
        "leave_filter_ms": _ms(filter_s),
        "join_extend_ms": _ms(extend_s),
    }


def _filled(cache: list[Any], length: int, shape: Shape) -> list[Any]:
    import mlx.core as mx

    for layer in cache:
        kv = (1, shape.num_kv_heads, length, shape.head_dim)
        layer.update_and_fetch(mx.random.normal(kv), mx.random.normal(kv))
    # One step and back, so that every buffer has room for the measured token (no growth while timed).
    for layer in cache:
        kv = (1, shape.num_kv_heads, 1, shape.head_dim)
        layer.update_and_fetch(mx.zeros(kv), mx.zeros(kv))
        layer.trim(1)
    mx.eval([layer.state for layer in cache])
    return cache


def _timed_eval(output: Any, caches: list[Any]) -> None:
    """Evaluate a step with its cache writes, then take the token back out, so every repeat is alike."""
    import mlx.core as mx

    mx.eval(output, [c.state for c in caches])
    for c in caches:
        c.trim(1)


def _time(run: Callable[[], None]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--repeats", type=int, default=15, help="alternating pairs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    add_blas_option(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
