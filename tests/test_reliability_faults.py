"""Faults: kill -9 mid-generation under the process supervisor, damaged state files, QMD misbehaving.

- The sidecar runs under the real keeper; it is killed with SIGKILL while it streams an answer. The
  keeper starts it again, and every session persisted before the kill comes back intact: its next
  turn rebuilds it from its file (the replay checked against the saved δ-state), and it then equals
  a solo run of the same turns on a server that was never killed.
- Truncated, garbage and foreign session files are reported in the log and skipped.
- QMD hanging, missing, crashing, printing garbage, megabytes or invalid Unicode: every request is
  answered (count 0) and no qmd process is left behind; the slowest answer is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from fake_qmd import TIMEOUT_S as QMD_TIMEOUT_S
from fake_qmd import write_fake_qmd
from reliability import AUTH, health, record_figures, saved_session, unexpected_files
from server_process import KEY, MODEL, Server, start_server, stop_server

from bench.soak import STATE_TOLERANCE
from common.ports import free_port
from common.settings import QmdSettings
from sidecar.server.qmd import MAX_OUTPUT_BYTES, qmd_lookup
from sidecar.sessions.keys import hash_session_key
from supervisors import process as process_module
from supervisors.process import ProcessSupervisor, live_children

pytestmark = pytest.mark.e2e

DEADLINE_S = 120.0


def wait_for(condition: Any, what: str) -> Any:
    """Poll `condition` until it returns something truthy (with a deadline); that value."""
    deadline = time.monotonic() + DEADLINE_S
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def turn(client: httpx.Client, key: str, messages: list[dict[str, Any]], **body: Any) -> httpx.Response:
    headers = {**AUTH, "X-OpenClaw-Session-Key": key}
    request = {"model": MODEL, "messages": messages, "max_completion_tokens": 4, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=request, headers=headers)


def stats(client: httpx.Client, key: str) -> dict[str, Any]:
    response = client.get("/v1/session", headers={**AUTH, "X-OpenClaw-Session-Key": key})
    assert response.status_code == 200, response.text
    return response.json()["delta"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- kill -9 under the keeper


@pytest.fixture
def supervised(
    tmp_path: Path, tiny_model_dir: Path, tiny_adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ProcessSupervisor, str, Path]]:
    port = free_port()
    state = tmp_path / "state"
    serve = [
        sys.executable, "-m", "installer", "serve", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir),
        "--model-id", MODEL, "--port", str(port), "--state-dir", str(state), "--api-key", KEY,
        "--context-window", "2048",
    ]  # fmt: skip
    monkeypatch.setattr(process_module, "sidecar_command", lambda root: serve)
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", 0.5)
    supervisor = ProcessSupervisor(tmp_path / "root")
    yield supervisor, f"http://127.0.0.1:{port}", state
    supervisor.stop()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", headers=AUTH, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _sidecar_pid(supervisor: ProcessSupervisor) -> int | None:
    keeper = supervisor.running_process()
    live = live_children(keeper) if keeper else []
    return live[0].pid if live else None


def test_kill_9_mid_generation_restarts_and_sessions_continue_intact(
    supervised: tuple[ProcessSupervisor, str, Path], server: Server
) -> None:
    supervisor, base_url, state = supervised
    supervisor.start()
    wait_for(lambda: _healthy(base_url), "the sidecar to be healthy")
    first_pid = _sidecar_pid(supervisor)
    conversations = {
        "fault:a": [{"role": "user", "content": "My cat is Miso."}],
        "fault:b": [{"role": "user", "content": "I live in Lisbon."}],
    }
    sent: dict[str, list[list[dict[str, Any]]]] = {key: [] for key in conversations}  # each turn's messages

    def next_turn(client: httpx.Client, key: str) -> str:
        sent[key].append(list(conversations[key]))
        reply = turn(client, key, conversations[key], attention_state=[f"note for {key}"])
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    with httpx.Client(base_url=base_url, timeout=120) as client:
        for key, messages in conversations.items():
            for follow_up in ("And then?", "Anything else?"):
                messages += [{"role": "assistant", "content": next_turn(client, key)}]
                messages += [{"role": "user", "content": follow_up}]
        files = {key: state / f"{hash_session_key(key)}.delta.session.npz" for key in conversations}
        before = {key: digest(path) for key, path in files.items()}
        # A long answer for session b is being streamed when the sidecar is killed.
        body = {"model": MODEL, "messages": conversations["fault:b"], "stream": True, "max_completion_tokens": 1000}
        broken = False
        started = time.monotonic()
        try:
            with client.stream(
                "POST", "/v1/chat/completions", json=body, headers={**AUTH, "X-OpenClaw-Session-Key": "fault:b"}
            ) as stream:
                lines = stream.iter_lines()
                for line in lines:
                    if '"content":"' in line and '"role"' not in line:
                        os.kill(first_pid, signal.SIGKILL)
                        started = time.monotonic()
                        break
                for line in lines:
                    assert line != "data: [DONE]", "the killed sidecar finished its answer"
        except httpx.TransportError:
            broken = True
        second_pid = wait_for(lambda: (pid := _sidecar_pid(supervisor)) != first_pid and pid, "a new sidecar")
        wait_for(lambda: _healthy(base_url), "the restarted sidecar to be healthy")
        back_after = time.monotonic() - started
        unchanged = sum(digest(path) == before[key] for key, path in files.items())
        # Each session's next real turn rebuilds it from its file, replaying its history.
        for key in conversations:
            next_turn(client, key)
        replays = client.get("/health", headers=AUTH).json()["sessions"]
    # The same turns, alone, on a server that was never killed.
    with httpx.Client(base_url=server.base_url, timeout=120) as solo:
        for key, turns in sent.items():
            for messages in turns:
                reply = turn(solo, f"solo-{key}", messages, attention_state=[f"note for {key}"])
                assert reply.status_code == 200, reply.text
    solo_dir = Path(server.log).parent / "state"
    intact, largest = 0, 0.0
    for key, path in files.items():
        tokens, states = saved_session(path)
        solo_tokens, solo_states = saved_session(solo_dir / f"{hash_session_key(f'solo-{key}')}.delta.session.npz")
        difference = max(float(np.max(np.abs(a - b))) for a, b in zip(states, solo_states, strict=True))
        largest = max(largest, difference)
        intact += tokens == solo_tokens and difference <= STATE_TOLERANCE
    log = "\n".join(supervisor.log_paths()[1].read_text(errors="replace").splitlines()[-400:])
    record_figures(
        "kill_9",
        {
            "sidecar_killed": 1,
            "restarted_by_keeper": int(second_pid != first_pid),
            "sessions_persisted": len(files),
            "session_files_unchanged_by_the_kill": unchanged,
            "replays_checked_against_saved_state": replays["replay_checks"],
            "replay_mismatches": replays["replay_mismatches"],
            "sessions_equal_to_solo_run": intact,
            "largest_state_difference": largest,
            "in_flight_answer_cut": int(broken),
            "seconds_from_kill_to_healthy": round(back_after, 1),
        },
    )
    assert "the sidecar was killed by SIGKILL" in log
    assert unchanged == len(files)
    assert (replays["replay_checks"], replays["replay_mismatches"]) == (len(files), 0)
    assert intact == len(files)
    assert unexpected_files(state) == []


# --------------------------------------------------------------------------- damaged state files


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("faults"))
    yield running
    if running.process.poll() is None:
        stop_server(running)


def test_damaged_state_files_are_reported_and_skipped(server: Server) -> None:
    state = Path(server.log).parent / "state"
    messages = [{"role": "user", "content": "Remember the number 42."}]
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        assert turn(client, "damage:source", messages).status_code == 200
        good = (state / f"{hash_session_key('damage:source')}.delta.session.npz").read_bytes()
        damages = {
            "truncated": good[: len(good) // 2],
            "garbage": os.urandom(len(good)),
            "empty": b"",
            "pickle": b"\x80\x04\x95" + b"cos\nsystem\n" + b"\x00" * 64,
            "flipped": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
        }
        skipped = 0
        for name, data in damages.items():
            key = f"damage:{name}"
            path = state / f"{hash_session_key(key)}.delta.session.npz"
            path.write_bytes(data)
            reply = turn(client, key, messages)
            assert reply.status_code == 200, reply.text
            # Skipped: the session starts fresh, and the file is replaced by a good one.
            assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert stats(client, key)["turns"] == 1
            skipped += f"ignoring session file {path.name}" in server.log_text()
    record_figures("damaged_state_files", {"damaged": len(damages), "reported_and_skipped": skipped})
    assert skipped == len(damages)
    assert health(server)["jobs"]["failed"] == 0


# --------------------------------------------------------------------------- QMD misbehaving

QMD_CASES = {
    "ok": "1", "slow": "1", "hang": "0", "missing": "0", "crash": "0", "killed": "0", "garbage": "0",
    "megabytes": "0", "surrogates": "1", "stdout-closed": "0",
}  # fmt: skip


def _qmd_processes(fake: Path, server: Server) -> list[psutil.Process]:
    """Live processes started from the fake qmd (it and the child it spawns name its folder)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        ours = process.pid != server.process.pid and any(str(fake.parent) in part for part in cmdline)
        if ours and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.mark.parametrize("megabytes", [2, 5, 20])
def test_qmd_output_over_the_cap_does_not_hang_the_lookup(tmp_path: Path, megabytes: int) -> None:
    # The cut-off pipe used to stay open, and asyncio's wait() for the killed qmd never returned.
    fake = tmp_path / "qmd"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write('x' * {megabytes} * 1024 * 1024)\n")
    fake.chmod(0o755)
    settings = QmdSettings(bin=str(fake), mode="search", timeout=QMD_TIMEOUT_S)
    result = asyncio.run(asyncio.wait_for(qmd_lookup(settings, "hello"), DEADLINE_S))
    assert result.snippets == [] and result.reason == f"qmd printed more than {MAX_OUTPUT_BYTES} bytes"


def test_qmd_faults_never_fail_or_hang_a_request(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path) -> None:
    fake = write_fake_qmd(tmp_path / "bin")
    own = start_server(
        tiny_model_dir, tiny_adapter_dir, tmp_path, "--attention-state-source", "qmd", "--qmd-bin", str(fake),
        "--qmd-mode", "search", "--qmd-timeout", f"{QMD_TIMEOUT_S:g}",
    )  # fmt: skip
    query = "Which pet? $(touch /tmp/qmd-pwned) `id`; rm -rf ~ | cat > /etc/x & --json -n 99 *?"
    counts: dict[str, str] = {}
    slowest = 0.0
    leftovers: list[str] = []
    try:
        with httpx.Client(base_url=own.base_url, timeout=60) as client:
            for behaviour in QMD_CASES:
                (fake.parent / "behaviour").write_text(behaviour)
                if behaviour == "missing":
                    fake.rename(fake.with_name("qmd.away"))
                started = time.monotonic()
                reply = turn(client, f"qmd:{behaviour}", [{"role": "user", "content": query}])
                slowest = max(slowest, time.monotonic() - started)
                assert reply.status_code == 200, (behaviour, reply.text)
                counts[behaviour] = reply.headers["X-Delta-Attention-State-Count"]
                if behaviour == "missing":
                    fake.with_name("qmd.away").rename(fake)
                leftovers += [f"{behaviour}: {p.pid}" for p in _qmd_processes(fake, own)]
    finally:
        stop_server(own)
    argvs = [json.loads(line) for line in (fake.parent / "argv.jsonl").read_text().splitlines()]
    record_figures(
        "qmd_faults",
        {
            "behaviours": len(QMD_CASES),
            "answered_200": len(counts),
            "qmd_timeout_s": QMD_TIMEOUT_S,
            "slowest_answer_s": round(slowest, 2),
            "qmd_processes_left": len(leftovers),
        },
    )
    assert counts == QMD_CASES
    assert leftovers == []
    # The query reached qmd as one literal argument, after "--", every time qmd ran.
    assert argvs and all(argv == ["search", "--json", "-n", "6", "--", query] for argv in argvs)
    assert not Path("/tmp/qmd-pwned").exists()
    assert "Traceback" not in own.log_text()
