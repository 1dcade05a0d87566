"""A restart costs no prefill: `python -m bench.restart --json [--quick]`.

On a Qwen3-shaped float32 model that tokenizes with Qwen3's real vocabulary (bench.memory's), two
OpenClaw-shaped sessions each send OpenClaw 2026.9.6's real first request and one more turn (4
turns), then each session's next turn is timed three ways, each on its own `serve` process:

- warm: the same server goes on (nothing restarted);
- restart: the server is stopped (SIGTERM) and started again on the same state dir, disk cache on;
- replay: the same with the disk cache off (`--max-disk-bytes 0`): today's behaviour before it,
  where a restarted session replays its whole history.

Reports the time to first token of each, their ratios, the disk cache's bytes after the 4 turns, and
the bytes each later turn wrote against the KV bytes of the tokens it added to the cache.
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

from bench.memory import QUICK_SYSTEM_CHARS, chosen_model, openclaw_turn_parser, session_requests
from bench.models import describe_model
from bench.runtime import reexec_with_openblas
from bench.sessions import Sidecar, serve_sidecar

SESSIONS = 2
TURNS_BEFORE = 2  # per session: 4 turns in all, then the timed one
REQUEST_TIMEOUT_S = 4 * 3600.0
WINDOW = 32768
FLOAT32_BYTES = 4


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas("bench.restart")
    system_chars = args.system_chars or (QUICK_SYSTEM_CHARS if args.quick else None)
    captured = json.loads(Path(args.turns_file).read_text(encoding="utf-8"))
    requests = [session_requests(captured, s, TURNS_BEFORE + 1, system_chars, args.tools) for s in range(SESSIONS)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="delta-mem-bench-restart-") as tmp:
        work = Path(tmp)
        model_dir, adapter_dir = chosen_model(args, work)
        model = describe_model(model_dir)
        warm = _run(model_dir, adapter_dir, work / "warm", requests, args.max_tokens, restart=False)
        restart = _run(model_dir, adapter_dir, work / "restart", requests, args.max_tokens, restart=True)
        replay = _run(model_dir, adapter_dir, work / "replay", requests, args.max_tokens, restart=True, disk=False)
    kv_per_token = _kv_bytes_per_token(model)
    written = [
        round(turn["bytes_written"] / (turn["tokens_added"] * kv_per_token), 3)
        for turn in restart["turns"]
        if turn["turn"] > 1
    ]
    report = {
        "model": model,
        "system_prompt_chars": system_chars or "all",
        "first_request_tokens": restart["turns"][0]["prompt_tokens"],
        "timed_request_tokens": restart["timed"][0]["prompt_tokens"],
        "warm_ttft_s": _mean_ttft(warm),
        "restart_ttft_s": _mean_ttft(restart),
        "replay_ttft_s": _mean_ttft(replay),
        "restart_vs_warm": round(_mean_ttft(restart) / _mean_ttft(warm), 3),
        "replay_vs_restart": round(_mean_ttft(replay) / _mean_ttft(restart), 2),
        "disk_bytes": restart["disk"]["bytes"],
        "kv_bytes_per_token": kv_per_token,
        "bytes_written_per_turn": [t["bytes_written"] for t in restart["turns"] if t["turn"] > 1],
        "written_vs_turn_kv": written,
        "runs": {"warm": warm, "restart": restart, "replay": replay},
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report["targets"] = {
        "restart_at_most_1_5x_warm": report["restart_vs_warm"] <= 1.5,
        "restart_at_least_5x_faster_than_replay": report["replay_vs_restart"] >= 5,
        "bytes_written_at_most_1_2x_turn_kv": max(written) <= 1.2,
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _run(
    model_dir: Path,
    adapter_dir: Path,
    work: Path,
    requests: list[list[dict[str, Any]]],
    max_tokens: int,
    restart: bool,
    disk: bool = True,
) -> dict[str, Any]:
    """4 turns (2 per session) on one server, then each session's next turn, after a restart or not."""
    extra = ["--max-sessions", str(SESSIONS + 1), "--max-kv-bytes", str(64 * 1024**3)]
    extra += ["--state-dir", str(work / "state")]  # both processes: after the `serve_sidecar` default
    if not disk:
        extra += ["--max-disk-bytes", "0"]
    turns = []
    with serve_sidecar(model_dir, adapter_dir, work / "first", WINDOW, *extra, timeout=REQUEST_TIMEOUT_S) as sidecar:
        for turn in range(TURNS_BEFORE):
            for session, own in enumerate(requests):
                before = _disk(sidecar).get("bytes_written", 0)
                row = _ask(sidecar, session, own[turn], max_tokens)
                sidecar.client.save_session(f"bench-{session}")  # returns once its chunks are on disk
                row["bytes_written"] = _disk(sidecar).get("bytes_written", 0) - before
                turns.append({"turn": turn + 1, **row})
        if not restart:
            timed = [_ask(sidecar, s, r[TURNS_BEFORE], max_tokens) for s, r in enumerate(requests)]
            return {"turns": turns, "timed": timed, "disk": _disk(sidecar)}
        disk_after = _disk(sidecar)
    with serve_sidecar(model_dir, adapter_dir, work / "again", WINDOW, *extra, timeout=REQUEST_TIMEOUT_S) as sidecar:
        timed = [_ask(sidecar, s, r[TURNS_BEFORE], max_tokens) for s, r in enumerate(requests)]
        return {"turns": turns, "timed": timed, "disk": disk_after, "disk_after_restart": _disk(sidecar)}


def _ask(sidecar: Sidecar, session: int, request: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    reply = sidecar.client.chat(request["messages"], f"bench-{session}", True, max_tokens, 0, tools=request["tools"])
    prefilled = reply.prompt_tokens - reply.cached_tokens
    return {
        "session": session,
        "prompt_tokens": reply.prompt_tokens,
        "prefilled_tokens": prefilled,
        # What the turn added to the session's cache: its prefill and its answer.
        "tokens_added": prefilled + reply.completion_tokens,
        "ttft_s": round(reply.ttft_s, 4),
    }


def _disk(sidecar: Sidecar) -> dict[str, Any]:
    return sidecar.client.get_json("/health")["disk_cache"]


def _mean_ttft(run: dict[str, Any]) -> float:
    return round(statistics.mean(t["ttft_s"] for t in run["timed"]), 4)


def _kv_bytes_per_token(model: dict[str, Any]) -> int:
    """K and V of one token in every layer, float32."""
    return 2 * model["num_hidden_layers"] * model["num_key_value_heads"] * model["head_dim"] * FLOAT32_BYTES


def _parser() -> argparse.ArgumentParser:
    return openclaw_turn_parser("python -m bench.restart", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
