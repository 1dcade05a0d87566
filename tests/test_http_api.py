"""The HTTP layer against a scripted engine: shapes, headers, errors, auth, limits, disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine, text_events
from fastapi.testclient import TestClient
from starlette.types import Message

from common.settings import QmdSettings, SidecarSettings
from sidecar.engine.interface import (
    ChatJob,
    EngineEvent,
    Failed,
    Finished,
    PromptDone,
    TextDelta,
)
from sidecar.server.app import create_app
from sidecar.server.memory_input import MAX_SNIPPETS
from sidecar.sessions.keys import hash_session_key

MODEL = "fake-model"
USER = [{"role": "user", "content": "hello there"}]


def settings(**changes: Any) -> SidecarSettings:
    return SidecarSettings(model_path="/models/fake", model_id=MODEL, **changes)


def wait_ready(client: TestClient, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 10
    while client.get("/health", headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "the app never became ready"


@contextmanager
def serving(engine: FakeEngine | None = None, **changes: Any) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = engine or FakeEngine(model_id=MODEL)
    app = create_app(settings(**changes), load_engine=lambda _: engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        key = changes.get("api_key")
        wait_ready(client, {"Authorization": f"Bearer {key}"} if key else None)
        yield client, engine


def chat(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body}, headers=headers)


def sse_events(text: str) -> list[Any]:
    """The data payloads of an SSE body; fails on any line that is not a data line."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ") and "\n" not in block, f"not a data event: {block!r}"
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# --------------------------------------------------------------------------- startup and health


def test_health_is_503_while_loading_then_reports_the_engine() -> None:
    release = threading.Event()
    engine = FakeEngine(model_id=MODEL)

    def slow_loader(_: SidecarSettings) -> FakeEngine:
        release.wait(30)
        return engine

    app = create_app(settings(), load_engine=slow_loader)
    with TestClient(app) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert loading.json()["model"] == MODEL
        assert_openai_error(chat(client), 503, "model_loading")
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL  # known before loading ends
        release.set()
        wait_ready(client)
        health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["adapter"] == {"variant": "tsw", "rank": 8, "layers": 2}
    assert health["backend"]["device"] == "cpu" and health["sessions"] == 0 and health["uptime_s"] >= 0
    assert engine.closed, "the lifespan closes the engine on shutdown"


def test_a_failed_load_is_reported_not_fatal() -> None:
    def broken_loader(_: SidecarSettings) -> FakeEngine:
        raise FileNotFoundError("config.json missing in /models/fake")

    app = create_app(settings(), load_engine=broken_loader)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "config.json missing" in health.json()["error"]
        error = assert_openai_error(chat(client), 503, "model_load_failed")
        assert "config.json missing" in error["message"]


def test_models_list() -> None:
    with serving() as (client, _):
        body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(MODEL, "model")]


# --------------------------------------------------------------------------- answers


def test_json_answer_with_usage_and_headers() -> None:
    engine = FakeEngine(lambda job: text_events("Hi", " there", prompt_tokens=40, cached_tokens=32), model_id=MODEL)
    with serving(engine) as (client, _):
        response = chat(client, headers={"X-OpenClaw-Session-Key": "agent:main:test"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi there", "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 40,
        "completion_tokens": 2,
        "total_tokens": 42,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    assert response.headers["X-Delta-Session"] == hash_session_key("agent:main:test")
    assert response.headers["X-Delta-Mode"] == "delta"
    assert response.headers["X-Delta-Attention-State-Count"] == "0"
    assert response.headers["X-Delta-Attention-State-Source"] == "none"
    assert "agent:main:test" not in response.text + str(response.headers)


def test_stream_shape_role_first_deltas_finish_usage_done() -> None:
    engine = FakeEngine(lambda job: text_events("One", " two", " three", prompt_tokens=9, cached_tokens=4))
    with serving(engine) as (client, _):
        response = chat(client, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["X-Delta-Attention-State-Source"] == "none"
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["One", " two", " three"]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop" and chunks[4]["choices"][0]["delta"] == {}
    usage = chunks[5]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert len(chunks) == 6


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    with serving() as (client, _):
        events = sse_events(chat(client, stream=True).text)
    assert events[-1] == "[DONE]"
    assert all(event["choices"] for event in events[:-1])


def tool_call_script(job: ChatJob) -> list[EngineEvent]:
    text = 'Checking.\n<tool_call>\n{"name": "exec", "arguments": {"command": "ls"}}\n</tool_call>'
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    return text_events(*pieces)


TOOLS = [{"type": "function", "function": {"name": "exec", "parameters": {"type": "object", "properties": {}}}}]


def test_streamed_tool_call_deltas_and_finish_reason() -> None:
    with serving(FakeEngine(tool_call_script, model_id=MODEL)) as (client, engine):
        events = sse_events(chat(client, stream=True, tools=TOOLS, tool_choice="auto").text)
    deltas = [event["choices"][0]["delta"] for event in events[:-1] if event["choices"]]
    text = "".join(delta.get("content") or "" for delta in deltas)
    assert text == "Checking."
    tool_deltas = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert len(tool_deltas) == 1
    call = tool_deltas[0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "exec" and json.loads(call["function"]["arguments"]) == {"command": "ls"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert engine.jobs[0].tools[0]["function"]["name"] == "exec"


def test_json_tool_call_answer() -> None:
    with serving(FakeEngine(tool_call_script, model_id=MODEL)) as (client, _):
        body = chat(client, tools=TOOLS).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "exec"


def test_tool_choice_none_sends_no_tools_and_parses_nothing() -> None:
    with serving(FakeEngine(tool_call_script, model_id=MODEL)) as (client, engine):
        body = chat(client, tools=TOOLS, tool_choice="none").json()
    assert engine.jobs[0].tools == ()
    assert "<tool_call>" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_named_tool_choice_must_name_a_tool() -> None:
    with serving() as (client, _):
        response = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert assert_openai_error(response, 400)["param"] == "tool_choice"


def test_messages_are_normalised_into_the_job() -> None:
    messages = [
        {"role": "system", "content": "system prompt"},
        {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "exec", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "output"},
    ]
    with serving() as (client, engine):
        response = chat(
            client, messages=messages, max_tokens=50, temperature=0.7, top_p=0.9, seed=3, stop=["END", "STOP"]
        )
    assert response.status_code == 200
    job = engine.jobs[0]
    assert [(m.role, m.content) for m in job.messages] == [
        ("system", "system prompt"),
        ("developer", "dev"),
        ("user", "first"),
        ("user", "part one\npart two"),
        ("assistant", ""),
        ("tool", "output"),
    ]
    assert job.messages[4].tool_calls == (
        {"id": "call_1", "type": "function", "function": {"name": "exec", "arguments": "{}"}},
    )
    assert job.messages[5].tool_call_id == "call_1"
    assert (job.max_tokens, job.temperature, job.top_p, job.seed, job.stop) == (50, 0.7, 0.9, 3, ("END", "STOP"))


def test_max_tokens_defaults_and_is_clamped_to_the_server_limit() -> None:
    with serving(max_output_tokens=100) as (client, engine):
        chat(client)
        chat(client, max_completion_tokens=10_000_000)
        chat(client, max_completion_tokens=20, max_tokens=30)
    assert [job.max_tokens for job in engine.jobs] == [100, 100, 20]
    assert (engine.jobs[0].temperature, engine.jobs[0].seed) == (ChatJob("k", (), 1).temperature, None)


def test_delta_mode_header() -> None:
    with serving() as (client, engine):
        base = chat(client, headers={"X-Delta-Mode": "BASE"})
        default = chat(client)
        bad = chat(client, headers={"X-Delta-Mode": "maybe"})
    assert base.headers["X-Delta-Mode"] == "base" and not engine.jobs[0].delta_enabled
    assert default.headers["X-Delta-Mode"] == "delta" and engine.jobs[1].delta_enabled
    assert assert_openai_error(bad, 400)["param"] == "X-Delta-Mode"


def test_without_an_adapter_the_mode_is_always_base() -> None:
    engine = FakeEngine(model_id=MODEL)
    engine.info.adapter = None
    with serving(engine) as (client, _):
        response = chat(client, headers={"X-Delta-Mode": "delta"})
    assert response.headers["X-Delta-Mode"] == "base" and not engine.jobs[0].delta_enabled


def test_session_key_comes_from_openclaw_headers() -> None:
    affinity = "be273215-dac7-474c-ad64-5e4247101cc9:0"
    with serving() as (client, engine):
        chat(client, headers={"session_id": affinity, "x-session-affinity": affinity})
        chat(client)
    assert [job.key_hash for job in engine.jobs] == [hash_session_key(affinity), hash_session_key("default")]


# --------------------------------------------------------------------------- hidden memory


@pytest.mark.parametrize("field", ["attention_state", "attentionState", "delta_attention_state"])
def test_attention_state_body_spellings(field: str) -> None:
    with serving() as (client, engine):
        response = chat(client, **{field: ["The user has a cat.", {"text": "Named Miso.", "score": 0.9}]})
    assert engine.jobs[0].snippets == ("The user has a cat.", "Named Miso.")
    assert response.headers["X-Delta-Attention-State-Count"] == "2"
    assert response.headers["X-Delta-Attention-State-Source"] == "request"
    assert "X-Delta-Attention-State-Warning" not in response.headers


def test_attention_state_header() -> None:
    header = json.dumps([{"snippet": "From the header."}])
    with serving() as (client, engine):
        response = chat(client, headers={"X-Delta-Attention-State": header}, stream=True)
    assert engine.jobs[0].snippets == ("From the header.",)
    assert response.headers["X-Delta-Attention-State-Count"] == "1"
    assert response.headers["X-Delta-Attention-State-Source"] == "request"


def test_bad_attention_state_is_reported_in_a_header_never_a_500() -> None:
    with serving() as (client, engine):
        not_json = chat(client, headers={"X-Delta-Attention-State": "{oops"})
        too_many = chat(client, attention_state=[f"fact {i}" for i in range(MAX_SNIPPETS + 5)])
        odd = chat(client, attention_state={"nested": {"deep": [1, 2]}})
    assert not_json.status_code == 200 and "not JSON" in not_json.headers["X-Delta-Attention-State-Warning"]
    assert not_json.headers["X-Delta-Attention-State-Count"] == "0"
    assert too_many.headers["X-Delta-Attention-State-Count"] == str(MAX_SNIPPETS)
    assert "5 snippet(s) over the limit" in too_many.headers["X-Delta-Attention-State-Warning"]
    assert len(engine.jobs[1].snippets) == MAX_SNIPPETS
    assert odd.status_code == 200 and odd.headers["X-Delta-Attention-State-Count"] == "0"


def test_source_none_ignores_hidden_memory_and_says_so() -> None:
    with serving(attention_state_source="none") as (client, engine):
        response = chat(client, attention_state=["ignored"])
    assert engine.jobs[0].snippets == ()
    assert response.headers["X-Delta-Attention-State-Source"] == "none"
    assert "turned off" in response.headers["X-Delta-Attention-State-Warning"]


FAKE_QMD = f"""#!{sys.executable}
import json, sys
with open(sys.argv[0] + ".argv", "w") as log:
    json.dump(sys.argv[1:], log)
print(json.dumps([{{"file": "qmd://notes/pets.md", "score": 0, "snippet": "@@ -1,2 @@\\nThe user has a cat."}}]))
"""


def test_qmd_source_fills_in_when_the_request_carries_none(tmp_path: Path) -> None:
    qmd = tmp_path / "qmd"
    qmd.write_text(FAKE_QMD)
    qmd.chmod(0o755)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "What pet do I have?"},
        {"role": "user", "content": [{"type": "text", "text": "ctx"}]},
    ]
    with serving(attention_state_source="qmd", qmd=QmdSettings(bin=str(qmd), mode="search", limit=2)) as (
        client,
        engine,
    ):
        from_qmd = chat(client, messages=messages)
        from_request = chat(client, messages=messages, attention_state=["explicit"])
    assert json.loads((tmp_path / "qmd.argv").read_text()) == [
        "search", "--json", "-n", "2", "--", "What pet do I have? ctx",
    ]
    assert engine.jobs[0].snippets == ("The user has a cat.",)
    assert from_qmd.headers["X-Delta-Attention-State-Source"] == "qmd"
    assert from_qmd.headers["X-Delta-Attention-State-Count"] == "1"
    assert engine.jobs[1].snippets == ("explicit",)
    assert from_request.headers["X-Delta-Attention-State-Source"] == "request"


def test_a_broken_qmd_still_answers_with_count_zero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with serving(attention_state_source="qmd", qmd=QmdSettings(bin=str(tmp_path / "missing-qmd"))) as (client, engine):
        with caplog.at_level(logging.WARNING, logger="sidecar.server.serving"):
            response = chat(client)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "hello there"
    assert response.headers["X-Delta-Attention-State-Count"] == "0"
    assert response.headers["X-Delta-Attention-State-Source"] == "qmd"
    assert "qmd binary not found" in caplog.text
    assert engine.jobs[0].snippets == ()


# --------------------------------------------------------------------------- engine failures


def failing_script(job: ChatJob) -> list[EngineEvent]:
    return [Failed("the prompt (9000 tokens) does not fit the context window (4096)", "context_length_exceeded", 400)]


def test_engine_failure_becomes_an_openai_error() -> None:
    with serving(FakeEngine(failing_script, model_id=MODEL)) as (client, _):
        error = assert_openai_error(chat(client), 400, "context_length_exceeded")
        events = sse_events(chat(client, stream=True).text)
    assert "context window" in error["message"] and error["type"] == "invalid_request_error"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[1]["error"]["code"] == "context_length_exceeded"
    assert events[-1] == "[DONE]" and len(events) == 3


def test_failure_mid_stream_is_a_data_event_then_done() -> None:
    def script(job: ChatJob) -> list[EngineEvent]:
        return [PromptDone(5, 0, 0), TextDelta("partial"), Failed("worker crashed", "engine_error", 500)]

    with serving(FakeEngine(script, model_id=MODEL)) as (client, _):
        events = sse_events(chat(client, stream=True, stream_options={"include_usage": True}).text)
        error = assert_openai_error(chat(client), 500, "engine_error")
    assert events[1]["choices"][0]["delta"]["content"] == "partial"
    assert events[2] == {
        "error": {"message": "worker crashed", "type": "server_error", "param": None, "code": "engine_error"}
    }
    assert events[3] == "[DONE]"
    assert error["type"] == "server_error"


def test_server_side_cancel_and_missing_finish_are_errors() -> None:
    scripts = {
        "cancelled": lambda job: [PromptDone(1, 0, 0), Finished("cancelled", 0)],
        "no finish": lambda job: [PromptDone(1, 0, 0), TextDelta("x")],
    }
    for name, script in scripts.items():
        with serving(FakeEngine(script, model_id=MODEL)) as (client, _):
            response = chat(client)
            events = sse_events(chat(client, stream=True).text)
        assert response.status_code in (500, 503), name
        assert "error" in events[-2] and events[-1] == "[DONE]", name


def test_an_engine_bug_gives_no_stack_trace(caplog: pytest.LogCaptureFixture) -> None:
    def script(job: ChatJob) -> list[EngineEvent]:
        raise RuntimeError("secret internal detail")

    with serving(FakeEngine(script, model_id=MODEL)) as (client, _):
        response = chat(client)
    error = assert_openai_error(response, 500, "internal_error")
    assert "secret" not in response.text
    assert error["type"] == "server_error"


def test_length_finish_reason() -> None:
    def script(job: ChatJob) -> list[EngineEvent]:
        return [PromptDone(3, 0, 0), TextDelta("cut"), Finished("length", 1)]

    with serving(FakeEngine(script, model_id=MODEL)) as (client, _):
        assert chat(client).json()["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------- request errors


def test_unknown_model_is_404() -> None:
    with serving() as (client, _):
        error = assert_openai_error(chat(client, model="gpt-4o"), 404, "model_not_found")
    assert error["param"] == "model" and MODEL in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": USER, "n": 3},
        {"model": MODEL, "messages": []},
        {"model": MODEL},
        {"messages": USER},
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        {"model": MODEL, "messages": USER, "temperature": "hot"},
        {"model": MODEL, "messages": USER, "max_tokens": 10**30, "top_p": 5},
        {"model": MODEL, "messages": "hello"},
        [1, 2, 3],
        "just a string",
    ],
)
def test_invalid_bodies_are_400_never_422(body: Any) -> None:
    with serving() as (client, engine):
        response = client.post("/v1/chat/completions", json=body)
    assert_openai_error(response, 400)
    assert engine.jobs == []


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b"[" * 50_000, b""])
def test_unparseable_bodies_are_400(raw: bytes) -> None:
    with serving() as (client, _):
        response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_unknown_route_and_wrong_method_have_the_openai_shape() -> None:
    with serving() as (client, _):
        assert_openai_error(client.get("/v1/nothing"), 404, "not_found")
        assert_openai_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_oversized_bodies_are_413() -> None:
    engine = FakeEngine(model_id=MODEL)
    app = create_app(settings(), load_engine=lambda _: engine, max_body_bytes=10_000)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 20_000}]}

    def chunked() -> Iterator[bytes]:
        data = json.dumps(big).encode()
        for start in range(0, len(data), 1_000):
            yield data[start : start + 1_000]

    with TestClient(app) as client:
        wait_ready(client)
        declared = client.post("/v1/chat/completions", json=big)
        streamed = client.post(
            "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        small = chat(client)
    assert_openai_error(declared, 413, "request_too_large")
    assert "transfer-encoding" not in declared.request.headers
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert_openai_error(streamed, 413, "request_too_large")
    assert small.status_code == 200 and len(engine.jobs) == 1


# --------------------------------------------------------------------------- auth


def test_api_key_is_required_on_every_route() -> None:
    with serving(api_key="s3cret") as (client, engine):
        for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/session"), ("GET", "/openapi.json"), ("GET", "/nope")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}]:
                response = client.request(method, path, headers=headers, json={"model": MODEL, "messages": USER})
                error = assert_openai_error(response, 401, "invalid_api_key")
                assert error["type"] == "authentication_error" and "s3cret" not in response.text
        ok = chat(client, headers={"Authorization": "Bearer s3cret"})
        lower = chat(client, headers={"Authorization": "bearer s3cret"})
    assert ok.status_code == 200 and lower.status_code == 200
    assert len(engine.jobs) == 2


# --------------------------------------------------------------------------- sessions


def test_session_admin_routes() -> None:
    key = {"X-OpenClaw-Session-Key": "agent:main:admin"}
    digest = hash_session_key("agent:main:admin")
    with serving() as (client, _):
        assert_openai_error(client.get("/v1/session", headers=key), 404, "session_not_found")
        assert_openai_error(client.post("/v1/session/save", headers=key), 404, "session_not_found")
        chat(client, headers=key)
        stats = client.get("/v1/session", headers=key)
        saved = client.post("/v1/session/save", headers=key)
        reset = client.delete("/v1/session", headers=key)
        reset_again = client.delete("/v1/session", headers=key)
        loaded = client.post("/v1/session/load", headers=key)
    assert stats.json() == {"session": digest, "turns": 1} and stats.headers["X-Delta-Session"] == digest
    assert saved.json() == {"session": digest, "saved": True}
    assert reset.json() == {"session": digest, "reset": True} and reset_again.json()["reset"] is False
    assert loaded.json() == {"session": digest, "loaded": True}


def test_logs_carry_hashed_session_keys_only(caplog: pytest.LogCaptureFixture) -> None:
    key = "agent:main:very-private-key"
    with serving() as (client, _):
        with caplog.at_level(logging.DEBUG):
            chat(client, headers={"X-OpenClaw-Session-Key": key})
            chat(client, headers={"X-OpenClaw-Session-Key": key}, stream=True)
    assert key not in caplog.text
    assert hash_session_key(key)[:12] in caplog.text


# --------------------------------------------------------------------------- disconnects


async def _call_app_until_first_body(body: dict[str, Any]) -> tuple[FakeEngine, list[Message]]:
    """Drive the ASGI app by hand; the client disconnects after the first body bytes (or at once)."""
    engine = FakeEngine(model_id=MODEL)
    engine.gate = asyncio.Event()  # the engine holds after PromptDone, like a long decode
    app = create_app(settings(), load_engine=lambda _: engine)
    state = app.state.server
    sent: list[Message] = []
    client_gone = asyncio.Event()
    raw = json.dumps(body).encode()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await client_gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            client_gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8765),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 10
        while state.chat is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        if not body.get("stream"):
            # A non-streamed answer sends nothing until the end: the client leaves while it waits.
            client_gone.set()
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return engine, sent


def test_a_client_leaving_a_stream_cancels_the_job() -> None:
    engine, sent = asyncio.run(_call_app_until_first_body({"model": MODEL, "messages": USER, "stream": True}))
    assert engine.streams[0].cancelled.is_set()
    bodies = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b'"role":"assistant"' in bodies and b"[DONE]" not in bodies


def test_a_client_leaving_a_json_request_cancels_the_job() -> None:
    engine, sent = asyncio.run(_call_app_until_first_body({"model": MODEL, "messages": USER}))
    assert engine.streams[0].cancelled.is_set()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499


def test_empty_text_deltas_make_no_chunks() -> None:
    with serving(FakeEngine(lambda job: text_events("a", "", "b", ""))) as (client, _):
        events = sse_events(chat(client, stream=True).text)
    contents = [e["choices"][0]["delta"].get("content") for e in events[1:-1] if e["choices"]]
    assert contents == ["a", "b", None]
