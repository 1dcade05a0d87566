"""Concurrent sessions against real servers: `python -m bench.concurrency --json [--quick]`.

Three servers on the same generated model, all started at once and measured in turns, each N
starting with another one (so the machine's load drifts over all three alike): `delta-mem-mlx
serve` with δ on and `--max-batch 8`, the same with `--max-batch 1` (one request at a time), and
mlx-lm's own batched server (`python -m mlx_lm server`, the plain model). Each gets one warm-up
request, then for N = 1, 2, 4, 8:

- a session round: N concurrent OpenClaw-shaped sessions (a shared system prompt; turn 1, then
  turn 2 dropping turn 1's internal-context message), every answer streamed, greedy, `--max-tokens`
  long: TTFT p50 and max, and end-to-end tokens/s (all answers' tokens over the round's time);
- a decode round: the same N sessions send their turn 2 again, so nothing is left to prefill:
  aggregate decode tokens/s (all streams' tokens after their first, over the time at least one
  stream was decoding), the median of `--decode-rounds` rounds;
- a gap round (at the largest N with --quick, at every N otherwise: `--gap-sessions`): N - 1
  streams decoding while one more session sends a long prompt (`--long-tokens`, nothing cached):
  the longest wait between two content chunks of a stream while that prompt is prefilled. A chunk
  is a word (the streaming detokenizer holds a word's tokens until it ends), so the sidecar's own
  figures from /health go beside it: its longest prefill step and the longest interval between two
  decode steps (the longest wait between two tokens).

Prints one JSON object; the figures depend on the machine's load (compare servers of one run).

`--openclaw` measures OpenClaw-shaped rows instead (the real system prompt and tools, 1k–4k tokens
of each session's own): the sidecar sharing the prompt's K/V, with per-row copies, and mlx-lm's
server (bench/openclaw_rows.py says how).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bench.models import describe_model
from bench.repo_files import OPENCLAW_TURNS, QWEN_VOCAB_CACHE
from bench.sessions import (
    API_KEY,
    MODEL_ID,
    Conversation,
    add_model_options,
    model_dirs,
    serve_sidecar,
    server_process,
    system_prompt,
    tokenizer_of,
)
from common.health import open_local
from common.ports import free_port
from installer.sidecar_client import SESSION_HEADER, Message

SESSIONS = (1, 2, 4, 8)
MLX_LM_PREFILL_STEP = 2048  # mlx_lm.server's --prefill-step-size default
SERVERS = ("max_batch_8", "max_batch_1", "mlx_lm_server")
DECODE_ONLY_SERVERS = ("max_batch_8", "mlx_lm_server")


@dataclass(frozen=True)
class Endpoint:
    """Where to send chat requests, and how one server wants them."""

    name: str
    url: str
    model: str
    api_key: str | None
    prefill_step: int


@dataclass
class Streamed:
    """One streamed answer: when it was sent, when each content chunk arrived, how many tokens."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    completion_tokens: int = 0

    @property
    def ttft(self) -> float:
        """Seconds from sending to the first content chunk."""
        return self.arrivals[0] - self.sent


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    if args.openclaw:
        from bench.openclaw_rows import run_openclaw

        return run_openclaw(args)
    system_tokens = args.system_tokens or (2000 if args.quick else 10000)
    long_tokens = args.long_tokens or (8192 if args.quick else 12288)
    sessions = tuple(int(n) for n in args.sessions.split(","))
    if args.gap_sessions:
        gap_sessions = tuple(int(n) for n in args.gap_sessions.split(","))
    else:
        gap_sessions = (max(sessions),) if args.quick else sessions
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="delta-mem-concurrency-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model_dir, adapter_dir = model_dirs(args, work)
        model = describe_model(model_dir)
        tokenizer = tokenizer_of(model_dir)
        system = system_prompt(tokenizer, system_tokens, args.seed)
        window = max(system_tokens, long_tokens) + 4096
        endpoints = [
            stack.enter_context(start_server(name, model_dir, adapter_dir, work / name, window, args.prefill_chunk))
            for name in (DECODE_ONLY_SERVERS if args.decode_only else SERVERS)
        ]
        if args.decode_only:
            figures = _decode_only(endpoints, system, max(sessions), args)
        else:
            servers = _measure(endpoints, tokenizer, system, long_tokens, sessions, gap_sessions, args)
            figures = {
                "long_prompt_tokens": long_tokens,
                "prefill_chunk": args.prefill_chunk,
                "gap_sessions": list(gap_sessions),
                "servers": servers,
                **_comparisons(servers, max(sessions)),
            }
    report = {
        "model": model,
        "system_prompt_tokens": system_tokens,
        "answer_tokens": args.max_tokens,
        **figures,
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


@contextmanager
def start_server(
    name: str, model_dir: Path, adapter_dir: Path, work: Path, window: int, prefill_chunk: int
) -> Iterator[Endpoint]:
    """One of SERVERS running on the bench model, as an endpoint."""
    if name == "mlx_lm_server":
        with mlx_lm_server(model_dir, work) as (endpoint, _):
            yield endpoint
        return
    batch = "8" if name == "max_batch_8" else "1"
    extra = ("--max-batch", batch, "--prefill-chunk", str(prefill_chunk))
    with serve_sidecar(model_dir, adapter_dir, work, window, *extra) as running:
        yield Endpoint(name, running.client.base_url, MODEL_ID, API_KEY, prefill_chunk)


@contextmanager
def mlx_lm_server(model_dir: Path, work: Path) -> Iterator[tuple[Endpoint, int]]:
    """mlx-lm's own batched server on the plain model (with its defaults), and its process id."""
    work.mkdir(parents=True)
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port),
            "--log-level", "WARNING"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, work / "server.log", lambda: _get(f"{url}/v1/models") == 200) as process:
        yield Endpoint("mlx_lm_server", url, "default_model", None, MLX_LM_PREFILL_STEP), process.pid


def _measure(
    endpoints: list[Endpoint],
    tokenizer: Any,
    system: str,
    long_tokens: int,
    sessions: tuple[int, ...],
    gap_sessions: tuple[int, ...],
    args: Any,
) -> dict[str, Any]:
    """A warm-up each, then for each N a session and decode round (and a gap round) on every server in turn."""
    rows: dict[str, list[dict[str, Any]]] = {e.name: [] for e in endpoints}
    for endpoint in endpoints:
        chat(endpoint, Conversation(system, seed=999).request(1), "warm-up", args.max_tokens)
    for turn, n in enumerate(sessions):
        # Each N starts with another server, so that none is always first: in three runs with a fixed
        # order, --max-batch 8 measured first at N = 1 was slower than the same code path measured second.
        for endpoint in endpoints[turn % len(endpoints) :] + endpoints[: turn % len(endpoints)]:
            row = {"n": n, **_session_round(endpoint, system, n, args, seed=n)}
            if n in gap_sessions:
                row.update(_gap_round(endpoint, tokenizer, long_tokens, n, args.max_tokens, seed=n))
                if endpoint.api_key:  # the sidecar's own step figures (the long prompt's steps are the longest)
                    row.update(_step_figures(get_json(endpoint, "/health")["batch"], row["max_stream_gap_s"]))
            rows[endpoint.name].append(row)
            _log(f"{endpoint.name}: {row}")
    return {e.name: {"rounds": rows[e.name], "prefill_step_tokens": e.prefill_step} for e in endpoints}


def _step_figures(batch: dict[str, Any], gap: float | None) -> dict[str, Any]:
    """The sidecar's longest prefill step and decode interval so far, and the gaps over that step."""
    step, interval = batch["longest_prefill_step_s"], batch["longest_decode_interval_s"]
    figures = {"prefill_step_longest_s": step, "decode_interval_longest_s": interval}
    if step:
        figures["decode_interval_over_longest_prefill_step"] = round(interval / step, 2)
        if gap is not None:
            figures["gap_over_longest_prefill_step"] = round(gap / step, 2)
    return figures


def _session_round(endpoint: Endpoint, system: str, n: int, args: Any, seed: int) -> dict[str, Any]:
    """N sessions at once, two OpenClaw-shaped turns each; then their turn 2 again, to decode only."""
    answers, second_turns, elapsed = _open_sessions(endpoint, system, n, args, seed)
    decode_rates = [_decode_round(endpoint, second_turns, args) for _ in range(args.decode_rounds)]
    ttfts = [a.ttft for a in answers]
    return {
        "tok_s": round(statistics.median(decode_rates), 2),
        "throughput_tok_s": round(sum(a.completion_tokens for a in answers) / elapsed, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def _open_sessions(
    endpoint: Endpoint, system: str, n: int, args: Any, seed: int
) -> tuple[list[Streamed], dict[int, list[Message]], float]:
    """N concurrent sessions of two turns each: every answer, each session's turn 2, and the time taken."""
    answers: list[Streamed] = []
    second_turns: dict[int, list[Message]] = {}
    lock = threading.Lock()

    def converse(index: int) -> None:
        conversation = Conversation(system, seed=1000 * seed + index)
        for turn in (1, 2):
            messages = conversation.request(turn)
            reply = chat(endpoint, messages, f"round{n}-{index}", args.max_tokens)
            conversation.answered("(answer)")
            with lock:
                answers.append(reply)
                second_turns[index] = messages

    began = time.perf_counter()
    run_threads(converse, n)
    return answers, second_turns, time.perf_counter() - began


def _decode_round(endpoint: Endpoint, second_turns: dict[int, list[Message]], args: Any) -> float:
    """The sessions send their turn 2 again, all at once: aggregate decode tokens/s."""
    again: list[Streamed] = []
    lock = threading.Lock()
    n = len(second_turns)

    def decode(index: int) -> None:
        reply = chat(endpoint, second_turns[index], f"round{n}-{index}", args.max_tokens)
        with lock:
            again.append(reply)

    run_threads(decode, n)
    return sum(a.completion_tokens - 1 for a in again) / decoding_time(again)


def _decode_only(endpoints: list[Endpoint], system: str, n: int, args: Any) -> dict[str, Any]:
    """`--decode-only`: N sessions opened on each server, then `--decode-rounds` decode rounds on each,
    the servers alternating which goes first; every round's tok/s, the medians and their ratio."""
    turns = {}
    for endpoint in endpoints:
        chat(endpoint, Conversation(system, seed=999).request(1), "warm-up", args.max_tokens)
        turns[endpoint.name] = _open_sessions(endpoint, system, n, args, seed=n)[1]
    rates: dict[str, list[float]] = {e.name: [] for e in endpoints}
    for repeat in range(args.decode_rounds):
        for endpoint in endpoints[repeat % 2 :] + endpoints[: repeat % 2]:
            rates[endpoint.name].append(round(_decode_round(endpoint, turns[endpoint.name], args), 2))
            _log(f"{endpoint.name} decode round {repeat}: {rates[endpoint.name][-1]} tok/s")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    sidecar, peer = (e.name for e in endpoints)
    return {
        "n": n,
        "decode_tok_s": rates,
        "median_tok_s": medians,
        "median_vs_peer": round(medians[sidecar] / medians[peer], 3),
        "round_ratios": [round(a / b, 3) for a, b in zip(rates[sidecar], rates[peer])],
    }


def _gap_round(
    endpoint: Endpoint, tokenizer: Any, long_tokens: int, n: int, max_tokens: int, seed: int
) -> dict[str, Any]:
    """N - 1 streams decoding, then a long prompt from one more session: the streams' longest wait."""
    streams: list[Streamed] = []
    started = [threading.Event() for _ in range(n - 1)]
    lock = threading.Lock()

    def decode(index: int) -> None:
        messages = [Message("user", f"Stream {seed}.{index}: tell a long story.")]
        reply = chat(endpoint, messages, f"gap{n}-{index}", 2 * max_tokens, started[index])
        with lock:
            streams.append(reply)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(n - 1)]
    for thread in threads:
        thread.start()
    for event in started:  # the long prompt comes once every stream is decoding (one by one for --max-batch 1)
        event.wait()
    long = chat(endpoint, [Message("user", _text(tokenizer, long_tokens, seed))], f"gap{n}-long", 8)
    for thread in threads:
        thread.join()
    gaps = [
        later - earlier
        for s in streams
        for earlier, later in zip(s.arrivals, s.arrivals[1:])
        if later > long.sent and earlier < long.arrivals[0]
    ]
    return {
        "max_stream_gap_s": round(max(gaps), 3) if gaps else None,
        "long_prompt_ttft_s": round(long.ttft, 3),
    }


def _comparisons(servers: dict[str, Any], n: int) -> dict[str, Any]:
    def at(name: str, key: str, sessions: int) -> float:
        return next(r[key] for r in servers[name]["rounds"] if r["n"] == sessions)

    batched = servers["max_batch_8"]
    ratios: dict[str, Any] = {
        "throughput_vs_peer_n8": round(at("max_batch_8", "tok_s", n) / at("mlx_lm_server", "tok_s", n), 3),
        "throughput_vs_unbatched_n8": round(at("max_batch_8", "tok_s", n) / at("max_batch_1", "tok_s", n), 3),
        "end_to_end_vs_peer_n8": round(
            at("max_batch_8", "throughput_tok_s", n) / at("mlx_lm_server", "throughput_tok_s", n), 3
        ),
        "end_to_end_vs_unbatched_n8": round(
            at("max_batch_8", "throughput_tok_s", n) / at("max_batch_1", "throughput_tok_s", n), 3
        ),
        "ttft_max_vs_peer_n8": round(at("max_batch_8", "ttft_max_s", n) / at("mlx_lm_server", "ttft_max_s", n), 3),
        "n1_vs_unbatched": round(at("max_batch_8", "tok_s", 1) / at("max_batch_1", "tok_s", 1), 3),
        "worst_gap_over_longest_prefill_step": _worst(batched, "gap_over_longest_prefill_step"),
        "worst_decode_interval_over_longest_prefill_step": _worst(
            batched, "decode_interval_over_longest_prefill_step"
        ),
    }
    worst_wait = ratios["worst_decode_interval_over_longest_prefill_step"]
    ratios["targets"] = {
        "throughput_vs_peer_n8_at_least_1": ratios["throughput_vs_peer_n8"] >= 1.0,
        "throughput_vs_unbatched_n8_at_least_1_8": ratios["throughput_vs_unbatched_n8"] >= 1.8,
        "ttft_max_vs_peer_n8_at_most_1_2": ratios["ttft_max_vs_peer_n8"] <= 1.2,
        "n1_vs_unbatched_at_least_0_95": ratios["n1_vs_unbatched"] >= 0.95,
        "token_wait_at_most_2_prefill_steps": worst_wait is not None and worst_wait <= 2.0,
    }
    return ratios


def _worst(server: dict[str, Any], key: str) -> float | None:
    return max((r[key] for r in server["rounds"] if key in r), default=None)


def chat(
    endpoint: Endpoint,
    messages: list[Message],
    session: str,
    max_tokens: int,
    first: threading.Event | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Streamed:
    """One greedy streamed answer, read to its end, with the arrival time of every content chunk
    (`first` is set at the first one)."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": max_tokens,
        "temperature": 0,
    }
    if tools:
        body["tools"] = tools
    headers = {"Content-Type": "application/json", SESSION_HEADER: session}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    request = urllib.request.Request(f"{endpoint.url}/v1/chat/completions", json.dumps(body).encode(), headers)
    streamed = Streamed(sent=time.perf_counter())
    with open_local(request, 3600) as response:
        for raw in response:
            payload = raw.decode("utf-8", "replace").strip().removeprefix("data: ")
            if payload == "[DONE]":
                break
            if not payload.startswith("{"):
                continue
            chunk = json.loads(payload)
            if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                streamed.arrivals.append(time.perf_counter())
                if first is not None:
                    first.set()
            usage = chunk.get("usage") or {}
            streamed.completion_tokens = usage.get("completion_tokens", streamed.completion_tokens)
    if first is not None:
        first.set()  # also when nothing streamed, so that no one waits for it
    if not streamed.arrivals:
        raise RuntimeError(f"{endpoint.name}: an answer streamed no content")
    streamed.completion_tokens = streamed.completion_tokens or len(streamed.arrivals)
    return streamed


def decoding_time(answers: list[Streamed]) -> float:
    """How long at least one answer was decoding: the union of first-to-last-chunk intervals."""
    total, end = 0.0, float("-inf")
    for first, last in sorted((a.arrivals[0], a.arrivals[-1]) for a in answers):
        if last > end:
            total += last - max(first, end)
            end = last
    return max(total, 1e-6)  # answers of one chunk each have no decoding time to speak of


def _text(tokenizer: Any, tokens: int, seed: int) -> str:
    """Random words of about `tokens` tokens, different for every seed (nothing cached matches it)."""
    rng = random.Random(f"long-{seed}")
    words = [f"w{rng.randrange(10**6)}" for _ in range(tokens)]
    ids = tokenizer.encode(" ".join(words))[:tokens]
    return tokenizer.decode(ids)


def run_threads(target: Any, n: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _get(url: str) -> int:
    with open_local(urllib.request.Request(url), 5) as response:
        return response.status


def get_json(endpoint: Endpoint, path: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{endpoint.url}{path}", headers={"Authorization": f"Bearer {endpoint.api_key}"})
    with open_local(request, 30) as response:
        return json.loads(response.read())


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--quick", action="store_true", help="a 2k-token system prompt and an 8k long prompt")
    parser.add_argument("--sessions", default=",".join(map(str, SESSIONS)), help="the N to run, comma-separated")
    parser.add_argument("--system-tokens", type=int, default=None, help="shared system prompt (2k quick, 10k)")
    parser.add_argument("--long-tokens", type=int, default=None, help="gap rounds' long prompt (8k quick, 12k)")
    parser.add_argument(
        "--gap-sessions", default=None, help="the N with a gap round, comma-separated (quick: the largest; else all)"
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length per turn")
    parser.add_argument("--decode-rounds", type=int, default=3, help="decode rounds per N (their median)")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="only decode rounds at the largest N, --max-batch 8 against mlx_lm.server, alternating",
    )
    parser.add_argument("--prefill-chunk", type=int, default=512, help="the sidecar's --prefill-chunk")
    add_model_options(parser)
    openclaw = parser.add_argument_group("--openclaw: OpenClaw's captured requests, sharing the prefix or not")
    openclaw.add_argument("--openclaw", action="store_true", help="the OpenClaw-shaped mode (bench/openclaw_rows.py)")
    openclaw.add_argument("--own-tokens", default=None, help="each session's own history, MIN,MAX tokens (1000,4000)")
    openclaw.add_argument("--system-chars", type=int, default=None, help="cut OpenClaw's system prompt to this length")
    openclaw.add_argument("--tools", type=int, default=None, help="send only OpenClaw's first N tools (default all)")
    openclaw.add_argument("--turns-file", default=str(OPENCLAW_TURNS), help="OpenClaw's captured requests")
    openclaw.add_argument("--vocab-dir", default=str(QWEN_VOCAB_CACHE), help="Qwen's vocabulary (bench.memory)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
