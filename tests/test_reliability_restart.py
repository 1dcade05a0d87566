"""Faults of the disk cache in a real server: kill -9 while it writes, a truncated chunk, a FIFO in place
of a chunk, a budget too small to hold anything. Each time the restarted server starts, answers, and
the session's next answer equals that of a server that never kept KV on disk (greedy, float32); and
SIGTERM stops it (stop_server fails the test after 60 s)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from reliability import AUTH, health, saved_session, unexpected_files
from server_process import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.e2e

SYSTEM = "You are a careful assistant with tools. " * 30
FAULTS = ("kill-9", "truncated-chunk", "fifo-chunk", "tiny-budget")
HEADERS = {**AUTH, "X-OpenClaw-Session-Key": "restart"}


def requests() -> list[list[dict[str, str]]]:
    """Three OpenClaw-shaped requests: each ends with an internal-context message the next one drops."""
    out, history = [], [{"role": "system", "content": SYSTEM}]
    for i in range(3):
        history = [*history, {"role": "user", "content": f"question {i}: what about item {i * 7}?"}]
        out.append([*history, {"role": "user", "content": f"[internal context {i}] notes {i}"}])
        history = [*history, {"role": "assistant", "content": f"answer {i}"}]
    return out


def ask(server: Server, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 8, "temperature": 0}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def replayed_answer(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The third answer from a server that keeps no KV on disk."""
    work = tmp_path_factory.mktemp("replay")
    server = start_server(tiny_model_dir, tiny_adapter_dir, work, "--max-disk-bytes", "0")
    try:
        for messages in requests():
            reply = ask(server, messages)
        assert health(server)["disk_cache"] == {"enabled": False}
        return reply["choices"][0]["message"]["content"]
    finally:
        stop_server(server)


@pytest.mark.parametrize("fault", FAULTS)
def test_after_a_disk_cache_fault_the_restarted_server_answers_as_a_replay(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, replayed_answer: str, fault: str
) -> None:
    extra = ("--max-disk-bytes", "1") if fault == "tiny-budget" else ()
    server = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path, *extra)
    first, second, third = requests()
    ask(server, first)
    kv = tmp_path / "state" / "kv"
    if fault == "kill-9":
        saved = httpx.post(f"{server.base_url}/v1/session/save", headers=HEADERS, timeout=60)
        assert saved.status_code == 200, saved.text  # the first turn's chunks are on disk
        first_end = _manifest_end(kv)
    ask(server, second)
    if fault == "kill-9":
        server.process.kill()  # at once after the answer: the writer may be in the middle of a chunk
        server.process.wait()
        # The first turn's manifest or the second's survived, whole, and names whole chunks.
        survived = _manifest_end(kv)
        assert survived >= first_end
        # What a kill leaves at each step of a write: a temporary file, and a chunk no manifest names.
        folder = next((kv / "sessions").iterdir(), kv / "sessions" / ("0" * 64 + ".delta"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".7.safetensors.x1y2.tmp").write_bytes(b"half a chunk")
        (folder / "99.safetensors").write_bytes(b"a chunk whose manifest was never written")
    else:
        stop_server(server)
    if fault in ("truncated-chunk", "fifo-chunk"):
        newest = max((kv / "sessions").glob("*/*.safetensors"), key=lambda p: int(p.stem))
        data = newest.read_bytes()
        newest.unlink()
        if fault == "truncated-chunk":
            newest.write_bytes(data[:100])
        else:  # a read of it would block for ever: the server must not wait for one
            os.mkfifo(newest)
    server = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path, *extra)
    try:
        reply = ask(server, third)
        saved = httpx.post(f"{server.base_url}/v1/session/save", headers=HEADERS, timeout=60)
        assert saved.status_code == 200, saved.text  # and its disk writes are done
        disk = health(server)["disk_cache"]
    finally:
        stop_server(server)
    assert reply["choices"][0]["message"]["content"] == replayed_answer
    leftovers = [p.name for p in kv.rglob("*") if p.name.endswith(".tmp") or p.name == "99.safetensors"]
    assert leftovers == []
    assert unexpected_files(tmp_path / "state") == []
    if fault == "tiny-budget":
        assert disk["bytes"] <= 1 and disk["hits"] == 0 and disk["evictions"] >= 1
    elif fault in ("truncated-chunk", "fifo-chunk"):
        assert disk["partial_hits"] == 1 and disk["hits"] == 0
        assert disk["read_failures"] == (fault == "fifo-chunk")
    else:
        # The disk was used: all of the second turn if its manifest survived, else the first turn's
        # files as far as they agree with the second turn's history, the rest replayed.
        assert disk["fallbacks"] == 0 and disk["restored_tokens"] > 0
        assert (disk["hits"], disk["partial_hits"]) == ((1, 0) if survived > first_end else (0, 1))


def _manifest_end(kv: Path) -> int:
    """The tokens the one session's manifest covers, each chunk it names checked against its sha256."""
    (folder,) = (kv / "sessions").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    for chunk in manifest["chunks"]:
        if chunk["file"] is not None:
            assert hashlib.sha256((folder / chunk["file"]).read_bytes()).hexdigest() == chunk["sha256"]
    return manifest["chunks"][-1]["end"]


# ---- hidden memory across kill -9 (issue 22 F1) -------------------------------------------------

MEMORY_TURNS = 5
MEMORY_ON = {0, 2, 4}  # the turns that carry hidden memory
KILL_AFTER = {1, 3}  # the killed server dies (kill -9) after answering these turns


def _chat(server: Server, work: Path, messages: list[dict[str, str]], memory: list[str]) -> tuple[str, Any]:
    """One turn: its answer, and the session's tokens and δ-states as saved after it."""
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_completion_tokens": 8, "temperature": 0}
    if memory:
        body["attention_state"] = memory
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    (path,) = (work / "state").glob("*.delta.session.npz")  # saved before the answer was sent
    return response.json()["choices"][0]["message"]["content"], saved_session(path)


def test_memory_turns_answer_alike_on_a_server_killed_between_turns(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    steady_dir, killed_dir = tmp_path / "steady", tmp_path / "killed"
    steady_dir.mkdir(), killed_dir.mkdir()
    with ThreadPoolExecutor(2) as starting:  # both start at once: a start is most of this test's time
        steady, killed = starting.map(partial(start_server, tiny_model_dir, tiny_adapter_dir), (steady_dir, killed_dir))
    messages = [{"role": "system", "content": SYSTEM}]
    try:
        for turn in range(MEMORY_TURNS):
            # A chat client: it sends back the answers it got, so each prompt runs into the last answer.
            messages = [*messages, {"role": "user", "content": f"question {turn}: and what about item {turn * 7}?"}]
            memory = [f"note {turn}: the user keeps {turn + 2} bees in a red hive"] if turn in MEMORY_ON else []
            answer, (tokens, states) = _chat(steady, steady_dir, messages, memory)
            killed_answer, (killed_tokens, killed_states) = _chat(killed, killed_dir, messages, memory)
            assert (killed_answer, killed_tokens) == (answer, tokens), f"turn {turn}"
            for layer, expected in zip(killed_states, states, strict=True):
                np.testing.assert_allclose(layer, expected, atol=1e-6, rtol=1e-6, err_msg=f"turn {turn}")
            messages = [*messages, {"role": "assistant", "content": answer}]
            if turn in KILL_AFTER:
                killed.process.kill()
                killed.process.wait()
                killed = start_server(tiny_model_dir, tiny_adapter_dir, killed_dir)
    finally:
        stop_server(steady)
        stop_server(killed)
