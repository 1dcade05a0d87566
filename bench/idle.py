"""Idle costs nothing, the return is warm: `python -m bench.idle --json [--quick]`.

On bench.memory's model (Qwen3-shaped float32, Qwen3's real vocabulary) two OpenClaw-shaped
sessions each send OpenClaw 2026.9.6's real first request; then each session's next turn is timed
three ways, each on its own `serve` process:

- warm: the same server goes on, the model loaded (`--keep-alive never`);
- unload: `--keep-alive` short; the server unloads the model when idle (every session's KV is on
  disk), and the next turn loads it again and restores its session from disk. The first of the
  two timed turns pays the load; the second finds the model loaded;
- replay: the server is restarted with the disk cache off (`--max-disk-bytes 0`): what a server
  without it does after an unload (Ollama, llama.cpp): the whole conversation prefilled again.

Reports the process RSS with the model loaded (both sessions' KV held) and unloaded, each timed
turn's time to first token and cached tokens, the model's load time (from /health), and the targets.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.memory import QUICK_SYSTEM_CHARS, chosen_model, openclaw_turn_parser, session_requests
from bench.models import describe_model
from bench.runtime import reexec_with_openblas
from bench.sessions import Sidecar, serve_sidecar

SESSIONS = 2
KEEP_ALIVE = "5s"
REQUEST_TIMEOUT_S = 4 * 3600.0
UNLOAD_TIMEOUT_S = 600.0
WINDOW = 32768
MB = 1024**2


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas("bench.idle")
    system_chars = args.system_chars or (QUICK_SYSTEM_CHARS if args.quick else None)
    captured = json.loads(Path(args.turns_file).read_text(encoding="utf-8"))
    requests = [session_requests(captured, s, 2, system_chars, args.tools) for s in range(SESSIONS)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="delta-mem-bench-idle-") as tmp:
        work = Path(tmp)
        model_dir, adapter_dir = chosen_model(args, work)
        model = describe_model(model_dir)
        warm = _warm(model_dir, adapter_dir, work / "warm", requests, args.max_tokens)
        unload = _unload(model_dir, adapter_dir, work / "unload", requests, args.max_tokens)
        replay = _replay(model_dir, adapter_dir, work / "replay", requests, args.max_tokens)
    warm_ttft = statistics.mean(t["ttft_s"] for t in warm["timed"])
    returning = unload["timed"][0]
    prompt = returning["prompt_tokens"]
    report = {
        "model": model,
        "system_prompt_chars": system_chars or "all",
        "first_request_tokens": unload["first"][0]["prompt_tokens"],
        "timed_request_tokens": prompt,
        "rss_loaded_mb": round(unload["rss_loaded"] / MB, 1),
        "rss_unloaded_mb": round(unload["rss_unloaded"] / MB, 1),
        "rss_unloaded_vs_loaded": round(unload["rss_unloaded"] / unload["rss_loaded"], 3),
        "model_load_s": unload["load_s"],
        "warm_ttft_s": round(warm_ttft, 4),
        "return_ttft_s": returning["ttft_s"],
        "return_second_session_ttft_s": unload["timed"][1]["ttft_s"],
        "replay_ttft_s": round(statistics.mean(t["ttft_s"] for t in replay["timed"]), 4),
        "return_cached_fraction": [round(t["cached_tokens"] / t["prompt_tokens"], 4) for t in unload["timed"]],
        # Turn 2 differs from the cache after the previous answer: a warm turn cannot reuse that tail either.
        "return_cached_vs_warm": [
            round(u["cached_tokens"] / w["cached_tokens"], 4) for u, w in zip(unload["timed"], warm["timed"])
        ],
        "runs": {"warm": warm, "unload": unload, "replay": replay},
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report["return_minus_load_vs_warm"] = round((returning["ttft_s"] - unload["load_s"]) / warm_ttft, 3)
    report["targets"] = {
        "unloaded_rss_at_most_25pct_of_loaded": report["rss_unloaded_vs_loaded"] <= 0.25,
        "unloaded_rss_at_most_400_mb": report["rss_unloaded_mb"] <= 400,
        "return_ttft_at_most_load_plus_1_5x_warm": returning["ttft_s"] <= unload["load_s"] + 1.5 * warm_ttft,
        "return_at_least_95pct_cached": min(report["return_cached_fraction"]) >= 0.95,
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _first_turns(sidecar: Sidecar, requests: list[list[dict[str, Any]]], max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for session, own in enumerate(requests):
        rows.append(_ask(sidecar, session, own[0], max_tokens))
        sidecar.client.save_session(f"bench-{session}")  # returns once its chunks are on disk
    return rows


def _timed(sidecar: Sidecar, requests: list[list[dict[str, Any]]], max_tokens: int) -> list[dict[str, Any]]:
    return [_ask(sidecar, s, own[1], max_tokens) for s, own in enumerate(requests)]


def _warm(
    model_dir: Path, adapter_dir: Path, work: Path, requests: list[list[dict[str, Any]]], max_tokens: int
) -> dict[str, Any]:
    with serve_sidecar(model_dir, adapter_dir, work, WINDOW, *_options(work), "--keep-alive", "never",
                       timeout=REQUEST_TIMEOUT_S) as sidecar:  # fmt: skip
        first = _first_turns(sidecar, requests, max_tokens)
        return {"first": first, "timed": _timed(sidecar, requests, max_tokens)}


def _unload(
    model_dir: Path, adapter_dir: Path, work: Path, requests: list[list[dict[str, Any]]], max_tokens: int
) -> dict[str, Any]:
    with serve_sidecar(model_dir, adapter_dir, work, WINDOW, *_options(work), "--keep-alive", KEEP_ALIVE,
                       timeout=REQUEST_TIMEOUT_S) as sidecar:  # fmt: skip
        process = psutil.Process(sidecar.process.pid)
        first = _first_turns(sidecar, requests, max_tokens)
        rss_loaded = process.memory_info().rss
        assert _health(sidecar)["model_state"] == "loaded", "the model unloaded before its RSS was read"
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        while _health(sidecar)["model_state"] != "unloaded":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model was not unloaded within {UNLOAD_TIMEOUT_S} s")
            time.sleep(0.2)
        rss_unloaded = process.memory_info().rss
        timed = _timed(sidecar, requests, max_tokens)
        health = _health(sidecar)
        return {
            "first": first, "timed": timed, "rss_loaded": rss_loaded, "rss_unloaded": rss_unloaded,
            "load_s": health["last_load_s"], "model_loads": health["model_loads"],
        }  # fmt: skip


def _replay(
    model_dir: Path, adapter_dir: Path, work: Path, requests: list[list[dict[str, Any]]], max_tokens: int
) -> dict[str, Any]:
    extra = [*_options(work), "--max-disk-bytes", "0", "--keep-alive", "never"]
    with serve_sidecar(model_dir, adapter_dir, work / "first", WINDOW, *extra, timeout=REQUEST_TIMEOUT_S) as sidecar:
        first = _first_turns(sidecar, requests, max_tokens)
    with serve_sidecar(model_dir, adapter_dir, work / "again", WINDOW, *extra, timeout=REQUEST_TIMEOUT_S) as sidecar:
        return {"first": first, "timed": _timed(sidecar, requests, max_tokens)}


def _options(work: Path) -> list[str]:
    # Both processes of a run share one state dir (after serve_sidecar's own --state-dir).
    state = str(work / "state")
    return ["--max-sessions", str(SESSIONS + 1), "--max-kv-bytes", str(64 * 1024**3), "--state-dir", state]


def _ask(sidecar: Sidecar, session: int, request: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    reply = sidecar.client.chat(request["messages"], f"bench-{session}", True, max_tokens, 0, tools=request["tools"])
    return {
        "session": session,
        "prompt_tokens": reply.prompt_tokens,
        "cached_tokens": reply.cached_tokens,
        "ttft_s": round(reply.ttft_s, 4),
    }


def _health(sidecar: Sidecar) -> dict[str, Any]:
    return sidecar.client.get_json("/health")


def _parser() -> argparse.ArgumentParser:
    return openclaw_turn_parser("python -m bench.idle", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
