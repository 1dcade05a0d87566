"""SIGTERM with answers in flight: every stream ends with an error event and `[DONE]`, every other
answer with a 503; nothing is cut.

A real `serve` with a short shutdown grace gets more answers than its one worker can finish within
it (greedy decoding of the tiny model runs to the token limit), then SIGTERM.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
from reliability import AUTH, record_figures
from server_process import MODEL, start_server

STREAMS = 24
JSON_ANSWERS = 4
GRACE_S = 0.5


def _stream(base_url: str, index: int, started: threading.Semaphore, bodies: dict[int, str]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"count to a thousand, please ({index})"}],
        "stream": True,
        "temperature": 0,
        "max_completion_tokens": 4000,
    }
    headers = {**AUTH, "X-OpenClaw-Session-Key": f"shutdown-{index}"}
    text = []
    try:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120) as reply:
            for chunk in reply.iter_text():
                if not text:
                    started.release()  # the role chunk: this answer is in flight
                text.append(chunk)
    except httpx.HTTPError as exc:
        text.append(f"<transport error: {type(exc).__name__}>")
    bodies[index] = "".join(text)


def _json_answer(base_url: str, index: int, results: dict[int, httpx.Response]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"and now in JSON ({index})"}],
            "temperature": 0, "max_completion_tokens": 4000}
    headers = {**AUTH, "X-OpenClaw-Session-Key": f"shutdown-json-{index}"}
    results[index] = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _events(body: str) -> list[str]:
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block]


def test_streams_cut_at_shutdown_end_with_an_error_and_done(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    server = start_server(
        tiny_model_dir, tiny_adapter_dir, tmp_path, "--context-window", "4096", "--shutdown-grace", str(GRACE_S)
    )
    answers: dict[int, httpx.Response] = {}
    threads = [threading.Thread(target=_json_answer, args=(server.base_url, i, answers)) for i in range(JSON_ANSWERS)]
    started = threading.Semaphore(0)
    bodies: dict[int, str] = {}
    threads += [threading.Thread(target=_stream, args=(server.base_url, i, started, bodies)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()  # the JSON requests first: once every stream has begun, they are in flight too
    for _ in range(STREAMS):
        assert started.acquire(timeout=60), "a stream never started"
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=120)
    status = server.process.wait(timeout=60)

    cut, finished = 0, 0
    for index in range(STREAMS):
        events = _events(bodies[index])
        assert events[-1] == "[DONE]", f"stream {index} ended without [DONE]: {bodies[index][-300:]!r}"
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down", last
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
            finished += 1
    json_statuses = sorted(answer.status_code for answer in answers.values())
    for answer in answers.values():
        assert answer.status_code == 200 or answer.json()["error"]["code"] == "server_shutting_down", answer.text
    log = server.log_text()
    record_figures("shutdown_streams", {"streams": STREAMS, "grace_s": GRACE_S, "cut": cut, "finished": finished,
                                        "json_statuses": json_statuses, "exit_status": status})
    # No stream can finish 4,000 tokens within the grace: every one is cut, and each is told so.
    assert (cut, finished) == (STREAMS, 0)
    assert len(answers) == JSON_ANSWERS and 503 in json_statuses
    assert status in (0, -signal.SIGTERM)
    assert "Traceback" not in log and "Cancel " not in log and " ERROR " not in log
