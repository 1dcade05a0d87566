"""Load and soak: many concurrent streaming sessions, some clients leaving mid-stream, then a solo replay.

`python -m bench.soak --json [--sessions 16 --turns 25 --rounds 4]` starts two tiny-model sidecars
under the process supervisor (a keeper), drives rounds of N concurrent OpenClaw-shaped sessions ×
M streaming turns against the first, each round with new sessions (every `--leave-every`th turn
the client disconnects after the first token, then sends the turn again), replays the last
round's sessions alone, one at a time, against the second, and compares each session's final
δ-state (per-layer statistics from `GET /v1/session`). It samples the first sidecar's RSS after
every turn. Prints one JSON object. tests/test_reliability_load.py runs one round of 8 × 25.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.ports import free_port
from common.settings import SidecarSettings, save_settings
from installer.sidecar_client import Message, SidecarClient, SidecarError
from supervisors.process import ProcessSupervisor
from supervisors.readiness import wait_until_healthy

MODEL_ID = "delta-mem-soak"
API_KEY = "soak"
STATE_TOLERANCE = 1e-4
_WORDS = (
    "agent", "tool", "memory", "session", "file", "workspace", "policy", "channel", "message", "reply",
    "search", "config", "user", "context", "note", "plan", "task", "result", "error", "retry", "limit",
    "budget", "token", "model", "provider", "gateway", "plugin",
)


@dataclass(frozen=True)
class SoakPlan:
    """How many sessions and turns, how often a client leaves, how often a turn carries memory."""

    sessions: int = 8
    turns: int = 25
    leave_every: int = 6
    memory_every: int = 3
    max_tokens: int = 6
    leave_max_tokens: int = 400
    system_words: int = 120
    seed: int = 0


@dataclass(frozen=True)
class TurnRequest:
    """One completed turn as it was sent: the messages and the hidden memory."""

    messages: tuple[Message, ...]
    attention_state: list[dict[str, Any]] | None


@dataclass
class LoadReport:
    """What the concurrent run did, per session and in all."""

    turns_completed: int = 0
    disconnects: int = 0
    errors: list[str] = field(default_factory=list)
    requests: dict[str, list[TurnRequest]] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    rss_samples: list[tuple[int, int, int]] = field(default_factory=list)  # (turns done, evictions, RSS bytes)
    cancelled_by_server: int = 0
    elapsed_s: float = 0.0


def session_keys(plan: SoakPlan, prefix: str) -> list[str]:
    """The session keys of one run."""
    return [f"{prefix}-{i}" for i in range(plan.sessions)]


def system_prompt(plan: SoakPlan) -> str:
    """The system prompt every session shares (so the shared prefix cache is in play)."""
    rng = random.Random(plan.seed)
    return "You are a careful agent. " + " ".join(rng.choice(_WORDS) for _ in range(plan.system_words))


def run_load(client: SidecarClient, plan: SoakPlan, prefix: str, server_pid: int | None = None) -> LoadReport:
    """Drive every session concurrently (one thread each) through all its turns."""
    report = LoadReport()
    lock = threading.Lock()
    before = client.get_json("/health")["jobs"]["cancelled"]
    started = time.perf_counter()

    def converse(number: int, key: str) -> None:
        history = [Message("system", system_prompt(plan))]
        requests: list[TurnRequest] = []
        answers: list[str] = []
        rng = random.Random(f"{plan.seed}:{number}")
        for turn in range(plan.turns):
            ask = Message("user", f"[{number}.{turn}] " + " ".join(rng.choice(_WORDS) for _ in range(8)))
            context = Message("user", f"(internal context {turn}: {rng.choice(_WORDS)})")
            memory = _memory(number, turn) if turn % plan.memory_every == 0 else None
            request = TurnRequest((*history, ask, context), memory)
            try:
                if turn % plan.leave_every == plan.leave_every - 1:
                    leave_mid_stream(client, key, request, plan.leave_max_tokens)
                    with lock:
                        report.disconnects += 1
                answer = send(client, key, request, plan.max_tokens)
            except (SidecarError, OSError) as exc:
                with lock:
                    report.errors.append(f"{key} turn {turn}: {exc}")
                return
            requests.append(request)
            answers.append(answer)
            # OpenClaw's next request drops the internal-context message and adds the answer.
            history += [ask, Message("assistant", answer)]
            rss = psutil.Process(server_pid).memory_info().rss if server_pid else 0
            evictions = client.get_json("/health")["sessions"]["evictions"]
            with lock:
                report.turns_completed += 1
                report.rss_samples.append((report.turns_completed, evictions, rss))
        with lock:
            report.requests[key], report.answers[key] = requests, answers

    threads = [
        threading.Thread(target=converse, args=(i, key), name=key) for i, key in enumerate(session_keys(plan, prefix))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.elapsed_s = round(time.perf_counter() - started, 2)
    report.cancelled_by_server = client.get_json("/health")["jobs"]["cancelled"] - before
    return report


def replay_solo(
    client: SidecarClient, requests: dict[str, list[TurnRequest]], key_for: dict[str, str], max_tokens: int
) -> dict[str, list[str]]:
    """Send every session's completed turns again, one session at a time; the answers per session."""
    answers: dict[str, list[str]] = {}
    for key, turns in requests.items():
        answers[key] = [send(client, key_for[key], turn, max_tokens) for turn in turns]
    return answers


def send(client: SidecarClient, key: str, request: TurnRequest, max_tokens: int) -> str:
    """One greedy streamed turn, read to the end; its text."""
    reply = client.chat(
        request.messages, key, delta=True, max_tokens=max_tokens, seed=0, attention_state=request.attention_state
    )
    if reply.finish_reason is None:
        raise SidecarError("the answer stream had no finish_reason")
    return reply.text


def leave_mid_stream(client: SidecarClient, key: str, request: TurnRequest, max_tokens: int) -> None:
    """Start a long streamed answer and hang up after its first content token (or its end, if sooner)."""
    with client.stream(request.messages, key, True, max_tokens, 0, request.attention_state) as answer:
        for chunk in answer:
            if chunk.text:
                return


def state_stats(client: SidecarClient, key: str) -> list[dict[str, Any]]:
    """Per-layer statistics of a session's δ-state (norm, max_abs, nonzero)."""
    return client.session_stats(key)["delta"]["delta_state"]


def largest_stat_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """The largest difference between two sessions' per-layer norm and max_abs."""
    if len(a) != len(b):
        return float("inf")
    return max(abs(x[name] - y[name]) for x, y in zip(a, b) for name in ("norm", "max_abs"))


def rss_growth_after_limits(samples: list[tuple[int, int, int]]) -> dict[str, Any]:
    """RSS when sessions first got evicted (the LRU limits reached), its peak after that, and at the end."""
    ordered = sorted(samples)
    limited = [rss for _, evictions, rss in ordered if evictions > 0]
    if not limited:
        return {"limits_reached": False}
    mb = 1024 * 1024
    return {
        "limits_reached": True,
        "rss_at_limits_mb": round(limited[0] / mb, 1),
        "rss_peak_after_mb": round(max(limited) / mb, 1),
        "rss_end_mb": round(limited[-1] / mb, 1),
        "growth_after_limits_mb": round((max(limited) - limited[0]) / mb, 1),
    }


def _memory(number: int, turn: int) -> list[dict[str, Any]]:
    return [{"text": f"Session {number} learned fact {turn}.", "source": "soak"}, f"Turn {turn} note."]


# --------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its JSON report; exit 1 when a goal is missed."""
    args = _parser().parse_args(argv)
    plan = SoakPlan(sessions=args.sessions, turns=args.turns, leave_every=args.leave_every)
    mb = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="delta-mem-soak-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model_dir, adapter_dir = _tiny_model(work)
        window = 512 + plan.turns * 80 + plan.system_words * 2
        loaded, loaded_pid = stack.enter_context(
            _supervised(work / "load", model_dir, adapter_dir, window, args.max_sessions, args.max_kv_bytes)
        )
        solo, _ = stack.enter_context(_supervised(work / "solo", model_dir, adapter_dir, window, plan.sessions, 2**40))
        # Each round brings new sessions; the old ones are evicted to disk. RSS at the end of each
        # round shows whether anything accumulates once the LRU limits hold.
        rounds = [run_load(loaded, plan, f"soak-r{number}", loaded_pid) for number in range(args.rounds)]
        last = rounds[-1]
        key_for = {key: f"solo-{key}" for key in last.requests}
        solo_answers = replay_solo(solo, last.requests, key_for, plan.max_tokens)
        differences = [
            largest_stat_difference(state_stats(loaded, key), state_stats(solo, key_for[key]))
            for key in last.requests
        ]
        health = loaded.get_json("/health")
    round_rss = [round(max(rss for _, _, rss in report.rss_samples) / mb, 1) for report in rounds]
    errors = [error for report in rounds for error in report.errors]
    output = {
        "plan": plan.__dict__,
        "rounds": args.rounds,
        "max_sessions": args.max_sessions,
        "max_kv_bytes": args.max_kv_bytes,
        "turns_completed": sum(report.turns_completed for report in rounds),
        "turns_planned": args.rounds * plan.sessions * plan.turns,
        "disconnects": sum(report.disconnects for report in rounds),
        "cancelled_by_server": sum(report.cancelled_by_server for report in rounds),
        "errors": errors,
        "jobs_failed": health["jobs"]["failed"],
        "evictions": health["sessions"]["evictions"],
        "sessions_equal_to_solo_replay": sum(d <= STATE_TOLERANCE for d in differences),
        "largest_state_difference": max(differences, default=0.0),
        "answers_equal_to_solo_replay": sum(last.answers[k] == solo_answers[k] for k in last.answers),
        **rss_growth_after_limits(rounds[0].rss_samples),
        "peak_rss_per_round_mb": round_rss,
        "elapsed_s": round(sum(report.elapsed_s for report in rounds), 1),
    }
    print(json.dumps(output, indent=None if args.json else 2))
    ok = not errors and output["sessions_equal_to_solo_replay"] == plan.sessions and not output["jobs_failed"]
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16, help="Concurrent sessions per round.")
    parser.add_argument("--turns", type=int, default=25, help="Streaming turns per session.")
    parser.add_argument("--rounds", type=int, default=4, help="Rounds, each with new sessions.")
    parser.add_argument("--leave-every", type=int, default=6, help="Every Nth turn the client leaves mid-stream.")
    parser.add_argument("--max-sessions", type=int, default=8, help="The loaded sidecar's LRU bound by count.")
    parser.add_argument("--max-kv-bytes", type=int, default=16 * 1024**2, help="Its LRU bound by KV bytes.")
    parser.add_argument("--json", action="store_true", help="One line of JSON.")
    return parser


def _tiny_model(work: Path) -> tuple[Path, Path]:
    from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

    model_dir = write_tiny_model(work / "model")
    return model_dir, write_tiny_adapter(work / "adapter", model_dir)


@contextmanager
def _supervised(
    root: Path, model_dir: Path, adapter_dir: Path, window: int, max_sessions: int, max_kv_bytes: int
) -> Iterator[tuple[SidecarClient, int]]:
    """A sidecar for a fresh root, run by the process supervisor; its client and the sidecar's pid."""
    port = free_port()
    settings = SidecarSettings(
        model_path=str(model_dir), model_id=MODEL_ID, adapter_path=str(adapter_dir), port=port, api_key=API_KEY,
        context_window=window, state_dir=str(root / "state"), max_sessions=max_sessions, max_kv_bytes=max_kv_bytes,
    )  # fmt: skip
    save_settings(root, settings)
    supervisor = ProcessSupervisor(root)
    supervisor.start()
    try:
        wait_until_healthy(settings, supervisor, 300)
        keeper = supervisor.running_process()
        sidecar_pid = keeper.children()[0].pid if keeper else 0
        yield SidecarClient(f"http://127.0.0.1:{port}", API_KEY, MODEL_ID), sidecar_pid
    finally:
        supervisor.stop()


if __name__ == "__main__":
    raise SystemExit(main())
