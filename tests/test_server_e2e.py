"""The real thing: `delta-mem-mlx serve` in its own process, the tiny model, the `openai` client."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_qmd import TIMEOUT_S as QMD_TIMEOUT_S
from fake_qmd import write_fake_qmd
from server_process import KEY, MODEL, Server, start_server, stop_server

from sidecar.sessions.keys import hash_session_key

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("e2e"))
    yield running
    if running.process.poll() is None:
        stop_server(running)


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def session(name: str) -> dict[str, str]:
    return {"X-OpenClaw-Session-Key": f"e2e:{name}"}


def test_health_and_models(server: Server, client: openai.OpenAI) -> None:
    health = httpx.get(f"{server.base_url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["adapter"] is not None
    assert [model.id for model in client.models.list()] == [MODEL]


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=6,
        temperature=0,
        extra_headers=session("stream"),
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    text_deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(text_deltas) >= 1


def test_content_parts_consecutive_users_and_cached_tokens(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You remember things. " * 20}
    turn1 = [
        system,
        {"role": "user", "content": "My cat is called Miso."},
        {"role": "user", "content": [{"type": "text", "text": "internal context one"}]},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=turn1, max_completion_tokens=4, temperature=0, extra_headers=session("parts")
    )
    answer = first.choices[0].message.content or ""
    # OpenClaw's next turn drops the internal-context message and adds the answer and a new question.
    turn2 = [
        system,
        {"role": "user", "content": "My cat is called Miso."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What is my cat called?"},
        {"role": "user", "content": [{"type": "text", "text": "internal context two"}]},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=turn2, max_completion_tokens=4, temperature=0, extra_headers=session("parts")
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached > 20, "the shared system prompt and first user message are reused"
    assert cached < second.usage.prompt_tokens


def test_tools_round_trip(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "read",
                "description": "Read a file",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
            },
        }
    ]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Read notes.md please."}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, tool_choice="auto", max_completion_tokens=8, temperature=0,
        extra_headers=session("tools"),
    )
    # finish_reason says why the answer ended: a tool call, the token limit, or the model's own end.
    choice = first.choices[0]
    assert first.usage is not None
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason == ("length" if first.usage.completion_tokens == 8 else "stop")
    # Whatever the random model said, the client runs the tool and sends the result back.
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": '{"path": "notes.md"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "The cat is called Miso."},
    ]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers=session("tools"),
    )
    usage = list(stream)[-1].usage
    assert first.usage is not None and usage is not None
    assert usage.prompt_tokens > first.usage.prompt_tokens  # the tool call and its result are in the prompt


def test_attention_state_forms(client: openai.OpenAI) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "What pet?"}], "max_completion_tokens": 2}
    body = client.chat.completions.with_raw_response.create(
        **base, extra_body={"attention_state": ["The user has a cat.", {"text": "Named Miso.", "score": 1}]},
        extra_headers=session("memory-body"),
    )
    camel = client.chat.completions.with_raw_response.create(
        **base, extra_body={"attentionState": [{"snippet": "Likes tea."}]}, extra_headers=session("memory-camel")
    )
    header = client.chat.completions.with_raw_response.create(
        **base,
        extra_headers={
            **session("memory-header"),
            "X-Delta-Attention-State": json.dumps([{"content": "Lives in Lisbon."}]),
        },
    )
    broken = client.chat.completions.with_raw_response.create(
        **base, extra_headers={**session("memory-broken"), "X-Delta-Attention-State": "{not json"}
    )
    none = client.chat.completions.with_raw_response.create(**base, extra_headers=session("memory-none"))
    counts = [r.headers["X-Delta-Attention-State-Count"] for r in (body, camel, header, broken, none)]
    sources = [r.headers["X-Delta-Attention-State-Source"] for r in (body, camel, header, broken, none)]
    assert counts == ["2", "1", "1", "0", "0"]
    assert sources == ["request", "request", "request", "none", "none"]  # an unreadable header carries nothing
    assert "not JSON" in broken.headers["X-Delta-Attention-State-Warning"]
    assert body.headers["X-Delta-Session"] == hash_session_key("e2e:memory-body")
    assert body.parse().choices[0].message is not None


def test_delta_mode_header(client: openai.OpenAI) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}
    off = client.chat.completions.with_raw_response.create(**base, extra_headers={"X-Delta-Mode": "base"})
    on = client.chat.completions.with_raw_response.create(**base)
    assert off.headers["X-Delta-Mode"] == "base" and on.headers["X-Delta-Mode"] == "delta"


def test_concurrent_sessions(server: Server, client: openai.OpenAI) -> None:
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def converse(name: str) -> None:
        try:
            messages: list[dict[str, Any]] = [{"role": "user", "content": f"I am session {name}."}]
            hashes = []
            for _ in range(2):
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, max_completion_tokens=3, temperature=0, stream=False,
                    extra_headers=session(f"concurrent-{name}"),
                )
                hashes.append(raw.headers["X-Delta-Session"])
                reply = raw.parse().choices[0].message.content or ""
                messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And now?"}]
            results[name] = hashes
        except BaseException as exc:  # surfaced below with the thread's name
            errors.append(exc)

    threads = [threading.Thread(target=converse, args=(str(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == [] and sorted(results) == ["0", "1", "2", "3"]
    for name, hashes in results.items():
        assert hashes == [hash_session_key(f"e2e:concurrent-{name}")] * 2
        stats = httpx.get(
            f"{server.base_url}/v1/session",
            headers={"Authorization": f"Bearer {KEY}", **session(f"concurrent-{name}")},
        )
        assert stats.status_code == 200 and stats.json()["session"] == hashes[0]


def test_disconnect_cancels_the_abandoned_answer(server: Server, client: openai.OpenAI) -> None:
    cancelled_before = _health(server)["jobs"]["cancelled"]
    with httpx.Client(timeout=120) as http:
        with http.stream(
            "POST",
            f"{server.base_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}", **session("leaver")},
            json={"model": MODEL, "messages": [{"role": "user", "content": "Talk a lot."}], "stream": True,
                  "max_completion_tokens": 1000, "temperature": 1.0, "seed": 7},
        ) as response:
            # Leave once the answer is being decoded (the role chunk comes before the job starts).
            next(line for line in response.iter_lines() if '"content":"' in line and '"content":""' not in line)
    # The engine stopped the abandoned job (nothing else runs in this server meanwhile) ...
    deadline = time.monotonic() + 60
    while (cancelled := _health(server)["jobs"]["cancelled"]) == cancelled_before:
        assert time.monotonic() < deadline, "the abandoned job was never cancelled"
        time.sleep(0.2)
    assert cancelled == cancelled_before + 1
    # ... long before its 1000 tokens: the generation thread did not stay on the abandoned answer.
    headers = {"Authorization": f"Bearer {KEY}", **session("leaver")}
    stats = httpx.get(f"{server.base_url}/v1/session", headers=headers, timeout=30).json()["delta"]
    assert stats["turns"] == 1 and stats["tokens"] - stats["prefilled_tokens"] < 1000
    left = f"session {hash_session_key('e2e:leaver')[:12]}: client left before the answer ended; job cancelled"
    assert left in server.log_text()


def _health(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def test_session_routes_answer_between_steps_and_refuse_to_reset_an_answering_session(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}", **session("answering")}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Talk a lot."}], "stream": True,
            "max_completion_tokens": 1000, "temperature": 0}  # fmt: skip
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{server.base_url}/v1/chat/completions", headers=headers, json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content":"' in line and '"content":""' not in line)
            busy = http.delete(f"{server.base_url}/v1/session", headers=headers)
            stats = http.get(f"{server.base_url}/v1/session", headers=headers)
            # Both were answered while the answer was still being generated: more of it follows.
            following = json.loads(next(line for line in lines if line).removeprefix("data: "))
            assert following["choices"][0]["finish_reason"] is None and following["choices"][0]["delta"]["content"]
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        assert stats.status_code == 200 and stats.json()["delta"]["tokens"] > 0
        # Once the answer has ended (the client left: it is cancelled), the session can be reset.
        deadline = time.monotonic() + 60
        while (reset := http.delete(f"{server.base_url}/v1/session", headers=headers)).status_code == 409:
            assert time.monotonic() < deadline, "the session stayed busy after its client left"
            time.sleep(0.2)
    assert reset.status_code == 200 and reset.json()["reset"] is True


def test_errors_have_the_openai_shape(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    too_big = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]},
        timeout=60,
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_logs_never_carry_the_session_key(server: Server) -> None:
    log = server.log_text()
    assert "e2e:" not in log
    assert hash_session_key("e2e:parts")[:12] in log


def test_sigterm_shuts_down_cleanly(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    own = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path)
    reply = httpx.post(
        f"{own.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2},
        timeout=120,
    )
    assert reply.status_code == 200
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, as a plain process would.
    assert stop_server(own) in (0, -signal.SIGTERM)
    log = own.log_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_qmd_source_in_a_real_server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path) -> None:
    qmd = write_fake_qmd(tmp_path / "bin")
    own = start_server(
        tiny_model_dir, tiny_adapter_dir, tmp_path,
        "--attention-state-source", "qmd", "--qmd-bin", str(qmd), "--qmd-mode", "search",
        "--qmd-timeout", f"{QMD_TIMEOUT_S:g}",
    )
    client = openai.OpenAI(base_url=f"{own.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    query = "Which pet? $(rm -rf ~); `id`"
    found = {}
    try:
        for behaviour in ("ok", "hang", "garbage"):
            (qmd.parent / "behaviour").write_text(behaviour)
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": query}], max_completion_tokens=2,
                extra_headers=session(f"qmd-{behaviour}"),
            )
            headers = raw.headers
            found[behaviour] = (headers["X-Delta-Attention-State-Count"], headers["X-Delta-Attention-State-Source"])
    finally:
        stop_server(own)
    assert found == {"ok": ("1", "qmd"), "hang": ("0", "qmd"), "garbage": ("0", "qmd")}
    argvs = [json.loads(line) for line in (qmd.parent / "argv.jsonl").read_text().splitlines()]
    assert argvs == [["search", "--json", "-n", "6", "--", query]] * 3
    log = own.log_text()
    assert f"qmd timed out after {QMD_TIMEOUT_S:g} s" in log and "qmd output is not JSON" in log
