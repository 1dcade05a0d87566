"""Single-session turns and the disk cache's writes: `python -m bench.turns --json [--quick]`.

Three parts, one JSON report:

- take: what a chunk for the disk cache costs the generation thread, on Qwen3-4B-shaped layers (36 ×
  8 KV heads × 128, bfloat16: 144 KiB per token), in process: taking it (`cache_chunk` and
  `chunk_on_host`), against encoding it there with MLX's own safetensors writer (what it did before
  the encoder thread); what the encoder thread then spends; and what one decode step of the session
  costs while something holds a slice of its K/V buffer (MLX copies the whole buffer) and once it
  has let go.
- gap: on a fresh sidecar, `--gap-rounds` rounds of: one session (W) prefills a first turn under a
  new system prompt alone, a second (S) starts a long answer beside W's, then W's answer ends and
  its chunks (the new shared prefix and W's own: a first turn's write, the largest) are written
  while S decodes. S's longest gap between two content chunks in the second after W's last one,
  against S's other gaps (p50, p95, max); and /health's longest interval between two decode steps
  over the whole part (the longest any stream waited between two tokens: the part is the server's
  first traffic after a warm-up) against the mean decode step of the warm-up's answer.
- ttft: the sidecar (`serve`, defaults: batching, the disk cache on) and mlx_lm.server on the same
  generated model: an OpenClaw-shaped session's turns 1–4 sent back to back, then a new session
  sharing the system prompt; `--rounds` rounds, each server first in turn; the median TTFT of each.

The figures depend on the machine's load: compare within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.concurrency import Endpoint, Streamed, chat, get_json, start_server
from bench.models import describe_model
from bench.sessions import Conversation, add_model_options, model_dirs, system_prompt, tokenizer_of
from installer.sidecar_client import Message

QWEN3_4B_LAYERS, QWEN3_4B_KV_HEADS, QWEN3_4B_HEAD_DIM = 36, 8, 128
TURNS = 4
WRITE_WINDOW_S = 1.0  # a stream's gaps this long after W's last token are the write's


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    system_tokens = args.system_tokens or (2000 if args.quick else 10000)
    started = time.perf_counter()
    report: dict[str, Any] = {"take": [_take(tokens) for tokens in args.take_tokens]}
    _log(f"take: {report['take']}")
    with tempfile.TemporaryDirectory(prefix="delta-mem-turns-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model_dir, adapter_dir = model_dirs(args, work)
        tokenizer = tokenizer_of(model_dir)
        system = system_prompt(tokenizer, system_tokens, args.seed)
        window = system_tokens + 4096
        sidecar, peer = (
            stack.enter_context(start_server(name, model_dir, adapter_dir, work / name, window, args.prefill_chunk))
            for name in ("max_batch_8", "mlx_lm_server")
        )
        report["gap"] = _gap(sidecar, tokenizer, system_tokens, args)
        _log(f"gap: {report['gap']}")
        chat(peer, [Message("user", "Warm up.")], "warm-up", args.max_tokens)
        report["ttft"] = _ttft([sidecar, peer], system, args)
        report["model"] = describe_model(model_dir)
    report.update(system_prompt_tokens=system_tokens, quick=args.quick)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


# ---- take: the generation thread's share of a chunk ----------------------------------------


def _take(tokens: int) -> dict[str, Any]:
    """A Qwen3-4B-shaped session of `tokens` tokens (a buffer with room left, as between turns): its
    chunk from token 0, taken, encoded, and the session's next step with and without it held."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from sidecar.delta.cache_chunks import CacheLayout, cache_chunk, kv_layout
    from sidecar.kvcache import disk_files

    cache = [KVCache() for _ in range(QWEN3_4B_LAYERS)]
    for layer in cache:
        kv = mx.random.normal((1, QWEN3_4B_KV_HEADS, tokens, QWEN3_4B_HEAD_DIM)).astype(mx.bfloat16)
        layer.update_and_fetch(kv, kv)
    mx.eval([layer.state for layer in cache])
    one = mx.zeros((1, QWEN3_4B_KV_HEADS, 1, QWEN3_4B_HEAD_DIM), mx.bfloat16)

    def step() -> float:
        began = time.perf_counter()
        mx.eval([layer.update_and_fetch(one, one) for layer in cache])
        return time.perf_counter() - began

    step()
    began = time.perf_counter()
    host = disk_files.chunk_on_host(cache_chunk(cache, 0))
    take_s = time.perf_counter() - began
    megabytes = sum(array.nbytes for _, array in host.arrays.values()) / 1e6
    began = time.perf_counter()
    encoded: list[bytearray] = []
    ids = list(range(cache[0].offset))  # the session's tokens and the step's
    encoder = threading.Thread(target=lambda c: encoded.append(disk_files.encode_chunk(c, ids, "bench")), args=(host,))
    encoder.start()
    encoder.join()
    encode_s = time.perf_counter() - began
    restore = _restore(bytes(encoded.pop()), CacheLayout(kv_layout(cache_chunk(cache, 0)), (None,) * len(cache)))
    chunk = cache_chunk(cache, 0)
    began = time.perf_counter()
    buffer = io.BytesIO()
    mx.save_safetensors(buffer, dict(chunk.arrays), metadata={"format": "1"})
    mlx_save_s = time.perf_counter() - began
    del chunk, buffer
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    held_s = step()  # the chunk's views still reference the session's buffers
    held_extra = mx.get_peak_memory() - active
    del host
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    released_s = step()
    released_extra = mx.get_peak_memory() - active
    return {
        "tokens": tokens,
        "chunk_mb": round(megabytes, 1),
        "generation_thread_take_ms": round(take_s * 1e3, 2),
        "generation_thread_take_ms_per_gb": round(take_s * 1e3 / megabytes * 1e3, 2),
        "mlx_save_safetensors_ms": round(mlx_save_s * 1e3, 1),
        "encoder_thread_ms": round(encode_s * 1e3, 1),
        "step_while_held_ms": round(held_s * 1e3, 1),
        "step_while_held_extra_mb": round(max(0, held_extra) / 1e6, 1),
        "step_released_ms": round(released_s * 1e3, 1),
        "step_released_extra_mb": round(max(0, released_extra) / 1e6, 1),
        **restore,
    }


def _restore(data: bytes, layout: Any) -> dict[str, float]:
    """Reading the chunk back into a new cache: the reader thread's parse, then what the generation
    thread does (views, checks, filling the cache), against MLX's safetensors reader there (before)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from sidecar.delta.cache_chunks import fill_cache
    from sidecar.kvcache import disk_files

    parsed: list[Any] = []
    began = time.perf_counter()
    reader = threading.Thread(target=lambda: parsed.append(disk_files.parse_chunk(data, "bench", "bench")))
    reader.start()
    reader.join()
    parse_s = time.perf_counter() - began
    began = time.perf_counter()
    fill_cache([KVCache() for _ in layout.states], [disk_files.decode_chunk(parsed.pop(), "bench", layout)])
    restore_s = time.perf_counter() - began
    began = time.perf_counter()
    mx.eval(list(mx.load(io.BytesIO(data), format="safetensors").values()))
    mlx_load_s = time.perf_counter() - began
    return {
        "reader_thread_parse_ms": round(parse_s * 1e3, 1),
        "generation_thread_restore_ms": round(restore_s * 1e3, 2),
        "mlx_load_ms": round(mlx_load_s * 1e3, 1),
    }


# ---- gap: a running stream while another session's turn is written -------------------------


def _gap(sidecar: Endpoint, tokenizer: Any, system_tokens: int, args: Any) -> dict[str, Any]:
    """Rounds of: W's long first turn (a new system prompt each round: the first turn's write is the
    largest, the shared prefix with W's own chunk), S's long answer beside W's end."""
    warm = chat(sidecar, [Message("user", "Warm up: count slowly.")], "gap-warm", args.answer_tokens)
    step_s = (warm.arrivals[-1] - warm.arrivals[0]) / max(1, warm.completion_tokens - 1)
    rounds = []
    for r in range(args.gap_rounds):
        system = system_prompt(tokenizer, system_tokens, args.seed + 1 + r)
        w, s = _written_beside_a_stream(sidecar, system, f"gap{r}", args.answer_tokens)
        ended = w.arrivals[-1]
        gaps = [(a, b) for a, b in zip(s.arrivals, s.arrivals[1:])]
        during = [b - a for a, b in gaps if b > ended and a < ended + WRITE_WINDOW_S]
        others = sorted(b - a for a, b in gaps if not (b > ended and a < ended + WRITE_WINDOW_S))
        rounds.append({
            "write_window_longest_gap_s": round(max(during), 4) if during else None,
            "other_gaps_p50_s": round(statistics.median(others), 4),
            "other_gaps_p95_s": round(others[int(0.95 * (len(others) - 1))], 4),
            "other_gaps_max_s": round(others[-1], 4),
        })  # fmt: skip
        _log(f"gap round {r}: {rounds[-1]}")
    health = get_json(sidecar, "/health")
    longest = health["batch"]["longest_decode_interval_s"]
    return {
        "decode_step_s": round(step_s, 4),
        "rounds": rounds,
        "longest_decode_interval_s": longest,
        "longest_interval_over_decode_step": round(longest / step_s, 2),
        "disk_bytes_written": health["disk_cache"]["bytes_written"],
        "disk_writes": health["disk_cache"]["writes"],
    }


def _written_beside_a_stream(sidecar: Endpoint, system: str, name: str, answer: int) -> tuple[Streamed, Streamed]:
    """W's first turn; once W decodes, S starts a long answer, still running when W's turn ends and is written."""
    decoding = threading.Event()
    replies: dict[str, Streamed] = {}

    def first_turn() -> None:
        replies["w"] = chat(sidecar, Conversation(system, seed=7).request(1), f"{name}-w", 32, decoding)

    thread = threading.Thread(target=first_turn)
    thread.start()
    decoding.wait()
    replies["s"] = chat(sidecar, [Message("user", f"{name}: a long story, please.")], f"{name}-s", answer)
    thread.join()
    return replies["w"], replies["s"]


# ---- ttft: single-session turns against mlx_lm.server ------------------------------------


def _ttft(endpoints: list[Endpoint], system: str, args: Any) -> dict[str, Any]:
    """Each round: turns 1–4 of a new session, back to back, then a new session's first turn, on each
    server in turn (each round starts with the other one)."""
    samples: dict[str, list[list[float]]] = {e.name: [] for e in endpoints}
    for r in range(args.rounds):
        for endpoint in endpoints[r % 2 :] + endpoints[: r % 2]:
            conversation = Conversation(system, seed=100 + r)
            ttfts = []
            for turn in range(1, TURNS + 1):
                reply = chat(endpoint, conversation.request(turn), f"ttft-{r}", args.max_tokens)
                conversation.answered("(answer)")
                ttfts.append(reply.ttft)
            fresh = chat(endpoint, Conversation(system, seed=900 + r).request(1), f"ttft-new-{r}", args.max_tokens)
            samples[endpoint.name].append([*ttfts, fresh.ttft])
            _log(f"ttft round {r} {endpoint.name}: {[round(t, 3) for t in samples[endpoint.name][-1]]}")
    medians = {name: [round(statistics.median(c), 3) for c in zip(*rounds)] for name, rounds in samples.items()}
    ours, peer = medians[endpoints[0].name], medians[endpoints[1].name]
    ratios = [round(a / b, 2) for a, b in zip(ours, peer)]
    return {
        "columns": [f"turn {t}" for t in range(1, TURNS + 1)] + ["new session"],
        "median_ttft_s": medians,
        "samples_s": {name: [[round(t, 3) for t in row] for row in rows] for name, rows in samples.items()},
        "sidecar_over_peer": ratios,
        "targets": {
            "turns_2_to_4_at_most_1_0": all(r <= 1.0 for r in ratios[1:TURNS]),
            "new_session_at_most_1_1": ratios[TURNS] <= 1.1,
        },
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.turns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--quick", action="store_true", help="a 2k-token system prompt instead of 10k")
    parser.add_argument("--system-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="ttft rounds per server (their median)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length of the ttft turns")
    parser.add_argument("--answer-tokens", type=int, default=256, help="the gap rounds' long answers")
    parser.add_argument("--gap-rounds", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=512, help="the sidecar's --prefill-chunk")
    parser.add_argument(
        "--take-tokens", type=lambda s: [int(n) for n in s.split(",") if n], default=[480, 1920],
        help="session lengths of the take part, comma-separated (480: 69 MB; empty: no take part)",
    )  # fmt: skip
    add_model_options(parser)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
