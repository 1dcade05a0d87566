"""`python -m bench.concurrency --openclaw --json [--quick]`: OpenClaw-shaped rows decoding together.

N = 1, 2, 4, 8 sessions, each OpenClaw 2026.9.6's real first request (its system prompt and 12
tools, the first user message with this session's id, the internal-context message) with a history
of its own between them (session i of the largest N: MIN + (MAX − MIN)·i/(N − 1) tokens, 1k–4k),
on a generated Qwen3-shaped model with Qwen's real vocabulary (bench.memory's) whose one row's K/V
at that length weighs about what a decode step reads of its weights, as Qwen3-4B's does on a Mac
(docs/benchmarks.md has the arithmetic). Servers, all started at once and measured in turn, the
order rotating so that the machine's load drifts over all alike:

- `share`: `serve` as it is, sharing the prompt's K/V (only when `serve --help` offers
  `--no-share-prefix`: before that, `serve` has no sharing to measure);
- `copies`: `serve --no-share-prefix` (plain `serve` before the flag): each session its own copy;
- `mlx_lm_server`: mlx-lm's batched server on the same plain model.

A warm-up session sends the prompt first (every server caches it). Then per N: the sessions new at
this N send their first request together (TTFT: their own history prefilled after the cached
prompt); `--decode-rounds` times, all N send their request again (nothing left to prefill) and
decode `--max-tokens` tokens together: decode tok/s over the time all N rows stream at once (the
median of the rounds); then each sidecar's resident KV (/health memory) against the ideal (one
prompt + each session's own tokens) and every server's RSS. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil

from bench.concurrency import Endpoint, Streamed, chat, decoding_time, get_json, mlx_lm_server, run_threads
from bench.memory import QUICK_SYSTEM_CHARS, session_requests, sharing_modes, vocab_model
from bench.models import describe_model
from bench.runtime import Shape
from bench.sessions import API_KEY, MODEL_ID, serve_sidecar, system_prompt, tokenizer_of
from common.kv_budget import GIB, KvShape, kv_bytes_per_token
from installer.memory_eval.conversations import Message
from sidecar.sessions.state import common_prefix
from sidecar.testing.qwen_vocab import QWEN_VOCAB_SIZE

# One row of ≈ 14.7k tokens holds 12 KiB × 14.7k ≈ 180 MB of float32 K/V; a decode step reads the
# layers (13 MB) and the untied output projection (156 MB) ≈ 170 MB (docs/benchmarks.md). As many
# query heads as KV heads: prefill costs half what grouped queries would for the same K/V bytes.
OPENCLAW_SHAPE = Shape("qwen3-openclaw-rows", 256, 3, 4, 4, 128, 768, QWEN_VOCAB_SIZE)
OWN_TOKENS = (1000, 4000)
QUICK_OWN_TOKENS = (200, 800)
HISTORY_MESSAGE_TOKENS = 500
FIRST_TURN_TOKENS = 4
WINDOW = 32768


def run_openclaw(args: argparse.Namespace) -> int:
    """The OpenClaw-shaped mode of bench.concurrency: print its JSON report."""
    sessions = tuple(int(n) for n in args.sessions.split(","))
    if list(sessions) != sorted(set(sessions)):
        raise SystemExit("--sessions must increase (each N adds sessions to the last)")
    own_range = tuple(int(n) for n in args.own_tokens.split(",")) if args.own_tokens else None
    own_range = own_range or (QUICK_OWN_TOKENS if args.quick else OWN_TOKENS)
    system_chars = args.system_chars or (QUICK_SYSTEM_CHARS if args.quick else None)
    sharing = sharing_modes()
    # `serve` as it is first: sharing when that is its default, else copies (and then nothing to compare).
    names = ("share", "copies") if sharing.default and sharing.flag else ("share",) if sharing.default else ("copies",)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="delta-mem-openclaw-rows-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        if args.model:
            if not args.adapter:
                raise SystemExit("--model needs --adapter")
            model_dir, adapter_dir = Path(args.model), Path(args.adapter)
        else:
            model_dir, adapter_dir = vocab_model(work, Path(args.vocab_dir), OPENCLAW_SHAPE)
        tokenizer = tokenizer_of(model_dir)
        captured = json.loads(Path(args.turns_file).read_text(encoding="utf-8"))
        requests = [
            _with_history(session_requests(captured, i, 1, system_chars, args.tools)[0], tokenizer, own, i)
            for i, own in enumerate(_own_tokens(own_range, max(sessions)))
        ]
        warm_up = session_requests(captured, len(requests), 1, system_chars, args.tools)[0]
        prompts = [_render(tokenizer, r) for r in [warm_up, *requests]]
        prefix_tokens = min(common_prefix(prompts[0], p) for p in prompts[1:])
        servers = [
            stack.enter_context(_server(n, model_dir, adapter_dir, work / n, args, sharing.default))
            for n in (*names, "mlx_lm_server")
        ]
        for endpoint, _ in servers:
            chat(endpoint, warm_up["messages"], "warm-up", FIRST_TURN_TOKENS, tools=warm_up["tools"])
        token_bytes = kv_bytes_per_token(KvShape.from_dirs(model_dir, adapter_dir))
        rounds = _measure(servers, requests, sessions, prefix_tokens, token_bytes, args)
        model = describe_model(model_dir)
        weights = _weights(model_dir, model)
    row_tokens = statistics.mean(len(p) for p in prompts[1:])
    report = {
        "model": model,
        "sharing": sharing.to_dict(),
        "prefix_tokens": prefix_tokens,
        "session_tokens": [len(p) for p in prompts[1:]],
        "kv_bytes_per_token": token_bytes,
        "row_kv_bytes": round(row_tokens * token_bytes),
        **weights,
        "row_kv_over_step_weights": round(row_tokens * token_bytes / weights["step_weight_bytes"], 3),
        "answer_tokens": args.max_tokens,
        "decode_rounds": args.decode_rounds,
        "servers": rounds,
        **_comparisons(rounds, max(sessions)),
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


@contextmanager
def _server(
    name: str, model_dir: Path, adapter_dir: Path, work: Path, args: Any, shared_by_default: bool
) -> Iterator[tuple[Endpoint, int]]:
    """One server and its process id: mlx-lm's, `serve` as it is, or `serve --no-share-prefix` (`copies`
    where serve shares by default)."""
    if name == "mlx_lm_server":
        with mlx_lm_server(model_dir, work) as running:
            yield running
        return
    extra = ["--max-batch", "8", "--prefill-chunk", str(args.prefill_chunk), "--max-sessions", "32",
             "--max-kv-bytes", str(64 * GIB)]  # fmt: skip
    if name == "copies" and shared_by_default:
        extra.append("--no-share-prefix")
    with serve_sidecar(model_dir, adapter_dir, work, WINDOW, *extra) as sidecar:
        yield Endpoint(name, sidecar.client.base_url, MODEL_ID, API_KEY, args.prefill_chunk), sidecar.process.pid


def _measure(
    servers: list[tuple[Endpoint, int]],
    requests: list[dict[str, Any]],
    sessions: tuple[int, ...],
    prefix_tokens: int,
    token_bytes: float,
    args: Any,
) -> dict[str, Any]:
    """Per N: the new sessions' first turns, the decode rounds, the resident KV; servers in rotating order."""
    rows: dict[str, list[dict[str, Any]]] = {e.name: [] for e, _ in servers}
    joined = 0
    for turn, n in enumerate(sessions):
        figures: dict[str, dict[str, Any]] = {e.name: {"n": n} for e, _ in servers}
        for endpoint, _ in _rotated(servers, turn):
            figures[endpoint.name].update(_first_turns(endpoint, requests, range(joined, n)))
        rates: dict[str, list[dict[str, float]]] = {e.name: [] for e, _ in servers}
        for decode_round in range(args.decode_rounds):
            for endpoint, _ in _rotated(servers, turn + decode_round + 1):
                rates[endpoint.name].append(_decode_round(endpoint, requests[:n], args.max_tokens))
        for endpoint, pid in servers:
            row = figures[endpoint.name]
            for key in rates[endpoint.name][0]:
                row[key] = round(statistics.median(r[key] for r in rates[endpoint.name]), 3)
            row["rss_bytes"] = psutil.Process(pid).memory_info().rss
            if endpoint.api_key:
                row.update(_resident_kv(get_json(endpoint, "/health")["memory"], prefix_tokens, token_bytes))
            rows[endpoint.name].append(row)
            _log(f"{endpoint.name}: {json.dumps(row)}")
        joined = n
    return {name: {"rounds": server_rows} for name, server_rows in rows.items()}


def _rotated(servers: list[tuple[Endpoint, int]], turn: int) -> list[tuple[Endpoint, int]]:
    """The servers starting with another one each turn, so that none is always measured first."""
    start = turn % len(servers)
    return servers[start:] + servers[:start]


def _first_turns(endpoint: Endpoint, requests: list[dict[str, Any]], new: range) -> dict[str, Any]:
    """The sessions new at this N send their first request together: their TTFT."""
    answers = _together(endpoint, [(i, requests[i]) for i in new], FIRST_TURN_TOKENS)
    ttfts = [a.ttft for a in answers]
    return {
        "new_sessions": len(new),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def _decode_round(endpoint: Endpoint, requests: list[dict[str, Any]], max_tokens: int) -> dict[str, float]:
    """All sessions send their request again and decode together."""
    answers = _together(endpoint, list(enumerate(requests)), max_tokens)
    union = sum(a.completion_tokens - 1 for a in answers) / decoding_time(answers)
    return {
        "decode_tok_s": all_rows_rate(answers) or union,
        "decode_union_tok_s": union,
        "resend_ttft_max_s": max(a.ttft for a in answers),
    }


def all_rows_rate(answers: list[Streamed]) -> float | None:
    """Tokens per second while every answer streams: the chunks arriving between the last first chunk
    and the first last chunk, counted as tokens at each answer's tokens per chunk (None when the answers
    never all streamed at once)."""
    start = max(a.arrivals[0] for a in answers)
    end = min(a.arrivals[-1] for a in answers)
    if end <= start:
        return None
    tokens = sum(sum(start < t <= end for t in a.arrivals) * a.completion_tokens / len(a.arrivals) for a in answers)
    return tokens / (end - start)


def _together(endpoint: Endpoint, requests: list[tuple[int, dict[str, Any]]], max_tokens: int) -> list[Streamed]:
    answers: list[Streamed] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        session, request = requests[index]
        reply = chat(endpoint, request["messages"], f"openclaw-{session}", max_tokens, tools=request["tools"])
        with lock:
            answers.append(reply)

    run_threads(send, len(requests))
    return answers


def _resident_kv(memory: dict[str, Any], prefix_tokens: int, token_bytes: float) -> dict[str, Any]:
    """The sidecar's KV bytes against one prompt + each session's own tokens (+ the δ records it reports)."""
    own = sum(s["tokens"] - prefix_tokens for s in memory["sessions"])
    ideal = (prefix_tokens + own) * token_bytes + memory["delta_record_bytes"]
    return {
        "kv_bytes": memory["kv_bytes"],
        "shared_prefix_bytes": memory["shared_prefix_bytes"],
        "resident_sessions": len(memory["sessions"]),
        "kv_ideal_bytes": round(ideal),
        "kv_over_ideal": round(memory["kv_bytes"] / ideal, 3),
    }


def _comparisons(servers: dict[str, Any], n: int) -> dict[str, Any]:
    """Sharing against copies and against mlx-lm's server at the largest N (and at N = 1), and the
    issue's targets for what ran."""

    def at(name: str, key: str, sessions: int) -> float:
        return float(next(r[key] for r in servers[name]["rounds"] if r["n"] == sessions))

    def ratio(first: str, second: str, key: str, sessions: int) -> float:
        return round(at(first, key, sessions) / at(second, key, sessions), 3)

    sidecars = [name for name in ("share", "copies") if name in servers]
    out: dict[str, Any] = {
        f"{name}_vs_peer_decode_max_n": ratio(name, "mlx_lm_server", "decode_tok_s", n) for name in sidecars
    }
    targets: dict[str, bool] = {}
    if "share" in servers:
        out["share_kv_over_ideal_max_n"] = at("share", "kv_over_ideal", n)
        targets["share_vs_peer_decode_at_least_1_8"] = out["share_vs_peer_decode_max_n"] >= 1.8
        targets["share_kv_within_5_percent_of_ideal"] = out["share_kv_over_ideal_max_n"] <= 1.05
    if len(sidecars) == 2:
        out["share_vs_copies_decode_max_n"] = ratio("share", "copies", "decode_tok_s", n)
        out["share_vs_copies_decode_n1"] = ratio("share", "copies", "decode_tok_s", 1)
        out["share_vs_copies_ttft_max_n"] = ratio("share", "copies", "ttft_max_s", n)
        targets["share_vs_copies_decode_at_least_1_5"] = out["share_vs_copies_decode_max_n"] >= 1.5
        targets["share_n1_decode_at_least_0_95"] = out["share_vs_copies_decode_n1"] >= 0.95
    return {**out, "targets": targets}


def _own_tokens(own_range: tuple[int, ...], sessions: int) -> list[int]:
    """Each session's own history length, spread evenly over MIN..MAX."""
    low, high = own_range
    return [low + (high - low) * i // max(1, sessions - 1) for i in range(sessions)]


def _with_history(request: dict[str, Any], tokenizer: Any, tokens: int, session: int) -> dict[str, Any]:
    """The request with about `tokens` tokens of this session's own turns before its internal context."""
    *opening, context = request["messages"]
    history: list[Message] = []
    per_message = min(HISTORY_MESSAGE_TOKENS, tokens)
    for turn in range(max(1, tokens // per_message)):
        text = system_prompt(tokenizer, per_message, seed=1000 * session + turn)
        history.append(Message("assistant" if turn % 2 == 0 else "user", text))
    if history[-1].role == "assistant":  # a history that OpenClaw sends ends with the user's turn
        history.append(Message("user", f"Session {session}: go on."))
    return {"messages": [*opening, *history, context], "tools": request["tools"]}


def _render(tokenizer: Any, request: dict[str, Any]) -> list[int]:
    from sidecar.engine.interface import ChatMessage
    from sidecar.engine.prompts import render_prompt

    return render_prompt(tokenizer, [ChatMessage(m.role, m.content) for m in request["messages"]], request["tools"])


def _weights(model_dir: Path, model: dict[str, Any]) -> dict[str, int]:
    """The weights' bytes, and those a decode step reads (all but the input embedding, a lookup, when untied)."""
    total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    embedding = 0 if config.get("tie_word_embeddings") else model["vocab_size"] * model["hidden_size"] * 4
    return {"weight_bytes": total, "step_weight_bytes": total - embedding}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
