"""δ-mem runtime speed against the plain model: `python -m bench.runtime --json [--quick]`.

One process, one model with a random δ-mem adapter; "plain" is the same model with δ switched
off. Plain and δ runs alternate in pairs (warm-up first); each ratio is the median of the
per-pair ratios, so it compares the two under the same machine load, and the tokens-per-second
figures are medians. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
PREFILL_STEP = 512


@dataclass(frozen=True)
class Shape:
    """A Qwen3-shaped float32 model."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


QUICK = Shape("qwen3-h512-l8", 512, 8, 8, 4, 64, 1536, 8192)
QWEN3_0_6B = Shape("qwen3-0.6b-shape", 1024, 28, 16, 8, 128, 3072, 151936)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    if args.blas == "openblas":
        reexec_with_openblas("bench.runtime")
    import mlx.core as mx

    started = time.perf_counter()
    shapes = [QUICK] if args.quick else [QUICK, QWEN3_0_6B]
    runs = []
    for shape in shapes:
        # A 0.6B token takes ~0.4 s on 2 CPU cores: fewer pairs there.
        scale = 1 if shape is QUICK else 4
        prefill_pairs = max(2, args.prefill_pairs // scale)
        decode_pairs = max(2, args.decode_pairs // scale)
        runs.append(_run(shape, args.prompt_tokens, args.decode_tokens, prefill_pairs, decode_pairs, args.seed))
        _log(f"{shape.name}: {json.dumps({k: runs[-1][k] for k in ('prefill_ratio', 'decode_ratio')})}")
    report = {
        **{k: v for k, v in runs[0].items() if k != "samples"},
        "runs": runs,
        "quick": args.quick,
        "backend": {
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "platform": f"{platform.system()} {platform.machine()}",
            "blas": "openblas (LD_PRELOAD)" if OPENBLAS.name in os.environ.get("LD_PRELOAD", "") else "bundled",
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _run(
    shape: Shape, prompt_tokens: int, decode_tokens: int, prefill_pairs: int, decode_pairs: int, seed: int
) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from sidecar.delta.api import set_delta_controls

    model, config = build_model(shape, seed)
    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, shape.vocab_size, size=(1, prompt_tokens)))

    def fresh(delta: bool) -> list[Any]:
        cache = make_prompt_cache(model)
        set_delta_controls(cache, enabled=delta)
        return cache

    # Decoding continues a 128-token prompt and is trimmed back after each measurement (trim is
    # exact), so short measurements can alternate often: the machine's noise comes in bursts.
    decode_caches = {delta: fresh(delta) for delta in (False, True)}
    first_tokens = {delta: model(prompt[:, :128], cache=c)[:, -1].argmax(-1) for delta, c in decode_caches.items()}
    mx.eval(first_tokens, [layer.state for c in decode_caches.values() for layer in c])

    def prefill(delta: bool) -> float:
        cache = fresh(delta)
        began = time.perf_counter()
        for start in range(0, prompt_tokens, PREFILL_STEP):
            model(prompt[:, start : start + PREFILL_STEP], cache=cache)
            mx.eval([c.state for c in cache])
        return time.perf_counter() - began

    def decode(delta: bool) -> float:
        cache, token = decode_caches[delta], first_tokens[delta]
        began = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
            mx.async_eval(token)
        # The cache is part of the work: δ records its state after every token.
        mx.eval(token, [c.state for c in cache])
        elapsed = time.perf_counter() - began
        trim_prompt_cache(cache, decode_tokens)
        return elapsed

    _log(f"{shape.name}: warming up")
    prefill_timings = alternate(prefill, prefill_pairs)
    decode_timings = alternate(decode, decode_pairs)
    plain_prefill, delta_prefill = (statistics.median(p[i] for p in prefill_timings) for i in (0, 1))
    plain_decode, delta_decode = (statistics.median(p[i] for p in decode_timings) for i in (0, 1))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {
        "model": {**asdict(shape), "parameters": params, "dtype": "float32", "delta_layers": shape.num_layers},
        "adapter": {"rank": config.rank, "variant": config.variant, "delta_heads": list(config.delta_heads)},
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "prefill_pairs": prefill_pairs,
        "decode_pairs": decode_pairs,
        "prefill_tps_plain": round(prompt_tokens / plain_prefill, 1),
        "prefill_tps_delta": round(prompt_tokens / delta_prefill, 1),
        "prefill_ratio": _median_ratio(prefill_timings),
        "decode_tps_plain": round(decode_tokens / plain_decode, 2),
        "decode_tps_delta": round(decode_tokens / delta_decode, 2),
        "decode_ratio": _median_ratio(decode_timings),
        # Per-pair ratios show how much the machine's noise moves a single comparison.
        "samples": {
            "prefill_pair_ratios": [round(p / d, 3) for p, d in prefill_timings],
            "decode_pair_ratios": [round(p / d, 3) for p, d in decode_timings],
        },
    }


def build_model(shape: Shape, seed: int, delta: bool = True) -> tuple[Any, Any]:
    """A random float32 Qwen3 model of `shape`, with a random TSW δ-mem adapter on every layer unless
    `delta` is False, and the adapter's config."""
    import mlx.core as mx
    from mlx_lm.models import qwen3

    from sidecar.delta.adapter_files import model_dims
    from sidecar.delta.api import attach_tensors
    from sidecar.delta.config import DeltaMemConfig
    from sidecar.testing.tiny_model import random_adapter_tensors

    mx.random.seed(seed)
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads,
        rms_norm_eps=1e-6,
        vocab_size=shape.vocab_size,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=32768,
        head_dim=shape.head_dim,
        tie_word_embeddings=False,
        rope_theta=1e6,
    )
    model = qwen3.Model(args)
    mx.eval(model.parameters())
    config = DeltaMemConfig()
    dims = model_dims(
        {
            "hidden_size": shape.hidden_size,
            "num_hidden_layers": shape.num_layers,
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
        }
    )
    if delta:
        attach_tensors(model, config, random_adapter_tensors(config, dims, seed))
    return model, config


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    """Median over pairs of plain time / δ time (above 1: δ was faster)."""
    return round(statistics.median(plain / delta for plain, delta in pairs), 3)


def alternate(measure: Callable[[bool], float], repeats: int) -> list[tuple[float, float]]:
    """(measure(False), measure(True)) timings, e.g. (plain, δ), alternating which goes first,
    after one warm-up of each."""
    measure(False)
    measure(True)
    pairs = []
    for i in range(repeats):
        if i % 2:
            delta = measure(True)
            plain = measure(False)
        else:
            plain = measure(False)
            delta = measure(True)
        pairs.append((plain, delta))
    return pairs


def add_blas_option(parser: argparse.ArgumentParser) -> None:
    """--blas openblas|bundled: whether main() re-runs itself under OpenBLAS (see reexec_with_openblas)."""
    parser.add_argument(
        "--blas",
        choices=("openblas", "bundled"),
        default="openblas",
        help="on Linux, re-run under Debian's OpenBLAS when it is installed (default)",
    )


def reexec_with_openblas(module: str) -> None:
    """On Linux, run `python -m <module>` again (same arguments) with Debian's OpenBLAS preloaded."""
    # MLX's Linux CPU wheel bundles a slow reference BLAS; Debian's OpenBLAS is ~10x faster.
    if platform.system() != "Linux" or not OPENBLAS.exists():
        return
    if OPENBLAS.name in os.environ.get("LD_PRELOAD", ""):
        return
    env = {**os.environ, "LD_PRELOAD": f"{OPENBLAS} {os.environ.get('LD_PRELOAD', '')}".strip()}
    # One BLAS thread: MLX's own CPU stream thread plus OpenBLAS's pool oversubscribe small
    # machines, which mostly adds noise (on 2 cores the pair ratios spread from 0.8 to 1.1).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--quick", action="store_true", help="only the small model (a few minutes on 2 CPU cores)")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens per decode measurement")
    parser.add_argument("--prefill-pairs", type=int, default=7, help="plain/δ prefill pairs (a quarter at 0.6B)")
    parser.add_argument("--decode-pairs", type=int, default=40, help="plain/δ decode pairs (a quarter at 0.6B)")
    parser.add_argument("--seed", type=int, default=0)
    add_blas_option(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
