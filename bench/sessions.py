"""Session reuse against a real sidecar: `python -m bench.sessions --json [--quick]`.

Replays an OpenClaw-shaped session (a long system prompt, 8 turns, each request ending with an
internal-context message that the next request drops) against `delta-mem-mlx serve`, once with
the server's caches and once without (a fresh session per turn on a server started with
--no-prefix-cache). Then opens new sessions that share the first one's system prompt, to measure
what the shared prefix cache saves. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.models import describe_model, write_quick_model
from bench.runtime import OPENBLAS
from installer.sidecar_client import REQUEST_TIMEOUT_S, Message, SidecarClient
from sidecar.sessions.state import common_prefix

MODEL_ID = "delta-mem-bench"
API_KEY = "bench"
STARTUP_TIMEOUT_S = 300.0
_WORDS = (
    "agent tool memory session file workspace policy channel message reply search config user assistant "
    "context note plan task result error retry limit budget token model provider gateway plugin skill "
    "always never must should may before after when unless because therefore however instead"
).split()


@dataclass
class Sidecar:
    """A running `serve` process and a client for it."""

    process: subprocess.Popen[bytes]
    client: SidecarClient


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    system_tokens = args.system_tokens or (2000 if args.quick else 10000)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="delta-mem-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model_dir, adapter_dir = model_dirs(args, work)
        tokenizer = tokenizer_of(model_dir)
        system = system_prompt(tokenizer, system_tokens, args.seed)
        window = system_tokens + 4096
        cached = stack.enter_context(serve_sidecar(model_dir, adapter_dir, work / "cached", window))
        uncached = stack.enter_context(
            serve_sidecar(model_dir, adapter_dir, work / "uncached", window, "--no-prefix-cache")
        )
        turns = _replay(cached.client, tokenizer, system, args.turns, args.max_tokens, fresh_sessions=False)
        no_cache = _replay(uncached.client, tokenizer, system, args.turns, args.max_tokens, fresh_sessions=True)
        new_sessions = _new_sessions(cached.client, uncached.client, system, args)
        model = describe_model(model_dir)
    speedup = _mean(t["ttft_s"] for t in no_cache[1:]) / _mean(t["ttft_s"] for t in turns[1:])
    report = {
        "model": model,
        "system_prompt_tokens": system_tokens,
        "turns": turns,
        "no_cache_turns": no_cache,
        "speedup_turns_2plus": round(speedup, 2),
        **new_sessions,
        "targets": {
            "prefilled_within_new_plus_512": all(t["prefilled_tokens"] <= t["new_tokens"] + 512 for t in turns[1:]),
            "speedup_turns_2plus_at_least_3": speedup >= 3,
            "new_session_within_1_5x_non_shared": new_sessions["new_session_vs_non_shared"] <= 1.5,
            "shared_cache_speedup_at_least_3": new_sessions["shared_cache_speedup"] >= 3,
        },
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


class Conversation:
    """The OpenClaw-shaped requests of one session: turn n = history + [internal context n]."""

    def __init__(self, system: str, seed: int):
        self.system = system
        self.rng = random.Random(seed)
        self.history: list[Message] = [Message("system", system)]

    def request(self, turn: int) -> list[Message]:
        """The messages OpenClaw sends for `turn` (1-based)."""
        self.history.append(Message("user", f"Turn {turn}: {self._sentence(40)}"))
        return [*self.history, Message("user", f"[internal context {turn}] {self._sentence(30)}")]

    def answered(self, text: str) -> None:
        """The assistant's answer joins the history; the internal-context message does not."""
        self.history.append(Message("assistant", text or "(no answer)"))

    def _sentence(self, words: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(words)) + "."


def _replay(
    client: SidecarClient, tokenizer: Any, system: str, turns: int, max_tokens: int, fresh_sessions: bool
) -> list[dict[str, Any]]:
    replay = Conversation(system, seed=1)
    rows, previous = [], []
    for turn in range(1, turns + 1):
        messages = replay.request(turn)
        session = f"bench-{turn}" if fresh_sessions else "bench"
        reply = client.chat(messages, session_key=session, delta=True, max_tokens=max_tokens, seed=0)
        prompt = _render(tokenizer, messages)
        rows.append(
            {
                "turn": turn,
                "prompt_tokens": reply.prompt_tokens,
                "cached_tokens": reply.cached_tokens,
                "prefilled_tokens": reply.prompt_tokens - reply.cached_tokens,
                "new_tokens": len(prompt) - common_prefix(prompt, previous),
                "ttft_s": round(reply.ttft_s, 4),
            }
        )
        previous = prompt
        replay.answered(reply.text)
        _log(f"{'no-cache' if fresh_sessions else 'cached'} turn {turn}: {rows[-1]}")
    return rows


def _new_sessions(
    cached: SidecarClient, uncached: SidecarClient, system: str, args: argparse.Namespace
) -> dict[str, Any]:
    """First turns of two more sessions sharing the system prompt, with the shared cache and without it.

    The reference is the time to prefill only a session's own tokens: the same first turn sent in a
    session that already holds the system prompt, so the server rolls back to the end of it and
    prefills exactly the tokens a new session cannot share, attending to the same prefix.
    """
    firsts, without, own_tokens = [], [], []
    for n in (2, 3):
        messages = Conversation(system, seed=100 + n).request(1)
        reply = cached.chat(messages, f"new-{n}", True, args.max_tokens, 0)
        firsts.append(reply.ttft_s)
        own_tokens.append(reply.prompt_tokens - reply.cached_tokens)
        without.append(uncached.chat(messages, f"new-{n}", True, args.max_tokens, 0).ttft_s)
    cached.chat(Conversation(system, seed=99).request(1), "reference", True, args.max_tokens, 0)
    reference = cached.chat(Conversation(system, seed=102).request(1), "reference", True, args.max_tokens, 0)
    new_ttft, without_ttft = _mean(firsts), _mean(without)
    return {
        "new_session_ttft_s": round(new_ttft, 4),
        "new_session_ttft_no_shared_cache_s": round(without_ttft, 4),
        "non_shared_prefill_s": round(reference.ttft_s, 4),
        "non_shared_tokens": round(_mean(own_tokens)),
        "reference_prefilled_tokens": reference.prompt_tokens - reference.cached_tokens,
        "new_session_vs_non_shared": round(new_ttft / reference.ttft_s, 2),
        "shared_cache_speedup": round(without_ttft / new_ttft, 2),
        "prefix_cache": cached.get_json("/health").get("prefix_cache"),
    }


@contextmanager
def serve_sidecar(
    model_dir: Path, adapter_dir: Path, work: Path, window: int, *extra: str, timeout: float = REQUEST_TIMEOUT_S
) -> Iterator[Sidecar]:
    """A `serve` process for the model (OpenBLAS preloaded on Linux), stopped when the block ends;
    `timeout` bounds each request."""
    work.mkdir(parents=True)
    port = _free_port()
    argv = [
        sys.executable, "-m", "installer", "serve", "--model", str(model_dir), "--adapter", str(adapter_dir),
        "--model-id", MODEL_ID, "--port", str(port), "--state-dir", str(work / "state"),
        "--context-window", str(window), "--api-key", API_KEY, "--log-level", "warning", *extra,
    ]  # fmt: skip
    client = SidecarClient(f"http://127.0.0.1:{port}", API_KEY, MODEL_ID, timeout=timeout)
    with server_process(argv, work / "serve.log", lambda: client.get_json("/health").get("status") == "ok") as process:
        yield Sidecar(process, client)


@contextmanager
def server_process(argv: list[str], log_path: Path, ready: Callable[[], bool]) -> Iterator[subprocess.Popen[bytes]]:
    """A server process (OpenBLAS preloaded on Linux, one BLAS thread), running until the block ends."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if OPENBLAS.exists() and OPENBLAS.name not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{OPENBLAS} {env.get('LD_PRELOAD', '')}".strip()
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench/runtime.py
    log = log_path.open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(ready, process, log_path)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_ready(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if ready():
                return
        except Exception:  # still starting (503 or connection refused)
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-2000:]}")


def model_dirs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """`--model` and `--adapter`, else a generated float32 model of the quick shape and a random TSW adapter."""
    if args.model:
        if not args.adapter:
            raise SystemExit("--model needs --adapter")
        return Path(args.model), Path(args.adapter)
    return write_quick_model(work)


def tokenizer_of(model_dir: Path) -> Any:
    """The model's tokenizer (mlx-lm's wrapper)."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model_dir)


def _render(tokenizer: Any, messages: list[Message]) -> list[int]:
    from sidecar.engine.interface import ChatMessage
    from sidecar.engine.prompts import render_prompt

    return render_prompt(tokenizer, [ChatMessage(m.role, m.content) for m in messages], ())


def system_prompt(tokenizer: Any, tokens: int, seed: int) -> str:
    """Deterministic instruction-like text of about `tokens` tokens."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    while len(tokenizer.encode("\n\n".join(paragraphs))) < tokens:
        paragraphs.append(" ".join(rng.choice(_WORDS) for _ in range(60)) + ".")
    text = "\n\n".join(paragraphs)
    ids = tokenizer.encode(text)[:tokens]
    return tokenizer.decode(ids)


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--quick", action="store_true", help="a 2k-token system prompt instead of 10k")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per turn")
    add_model_options(parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --adapter (read by model_dirs) and --seed."""
    parser.add_argument("--model", help="a model dir (default: a generated float32 Qwen3-shaped model)")
    parser.add_argument("--adapter", help="the δ-mem adapter dir for --model")
    parser.add_argument("--seed", type=int, default=0)


if __name__ == "__main__":
    raise SystemExit(main())
