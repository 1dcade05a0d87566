"""The OpenAI wire models: what OpenClaw sends parses, what it must not send is refused."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sidecar.server.protocol import (
    ApiError,
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChunkChoice,
    NamedToolChoice,
    ToolMessage,
    UserMessage,
)
from sidecar.sessions.keys import DEFAULT_SESSION_KEY, hash_session_key, session_key_from_headers

OPENCLAW_BODY = {
    "model": "delta-mem-test",
    "stream": True,
    "stream_options": {"include_usage": True},
    "tool_choice": "auto",
    "max_completion_tokens": 4096,
    "messages": [
        {"role": "system", "content": "You are OpenClaw."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "what now?"},
        {"role": "user", "content": [{"type": "text", "text": "internal context"}]},
    ],
    "tools": [
        {"type": "function", "function": {"name": "exec", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "read", "description": "Read a file"}},
    ],
    "store": False,
    "some_future_field": {"nested": [1, 2]},
}


def test_openclaw_request_parses_with_unknown_fields_ignored() -> None:
    request = ChatCompletionRequest.model_validate(OPENCLAW_BODY)
    assert request.stream and request.stream_options is not None and request.stream_options.include_usage
    assert request.max_completion_tokens == 4096 and request.max_tokens is None
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user", "user"]
    last = request.messages[-1]
    assert isinstance(last, UserMessage) and not isinstance(last.content, str)
    assert last.content[0].text == "internal context"
    assert request.tools is not None and [t.function.name for t in request.tools] == ["exec", "read"]
    assert "some_future_field" not in request.model_dump()


def test_assistant_tool_calls_and_tool_results_parse() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "list /tmp"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "ls", "arguments": '{"path": "/tmp"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
            ],
            "tool_choice": {"type": "function", "function": {"name": "ls"}},
        }
    )
    assistant, tool = request.messages[2], request.messages[3]
    assert isinstance(assistant, AssistantMessage) and assistant.tool_calls is not None
    assert assistant.tool_calls[0].function.arguments == '{"path": "/tmp"}'
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_1"
    assert isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name == "ls"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "x", "parameters": "not an object"}}]}, "tools"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(change: dict, field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == field


def test_stop_strings_and_attention_state_spellings() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate({**base, "stop": "END"}).stop_strings() == ("END",)
    assert ChatCompletionRequest.model_validate({**base, "stop": ["a", "b"]}).stop_strings() == ("a", "b")
    assert ChatCompletionRequest.model_validate(base).stop_strings() == ()
    request = ChatCompletionRequest.model_validate(
        {**base, "attentionState": ["two"], "attention_state": "one", "delta_attention_state": [{"text": "three"}]}
    )
    assert request.attention_state_values() == ["one", ["two"], [{"text": "three"}]]


def test_stream_chunk_serialises_only_the_delta_fields_it_carries() -> None:
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChunkChoice(delta=ChoiceDelta(content="hi"))])
    data = json.loads(chunk.model_dump_json())
    assert data["choices"][0]["delta"] == {"content": "hi"}
    assert data["choices"][0]["finish_reason"] is None
    assert data["object"] == "chat.completion.chunk"


def test_api_error_body_has_the_openai_shape() -> None:
    body = ApiError(404, "no such model", param="model", code="model_not_found").response_body()
    assert body == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_session_key_precedence_and_default() -> None:
    headers = {
        "X-Client-Request-Id": "req",
        "session_id": "sid",
        "x-session-affinity": "aff",
        "X-OpenClaw-Session-Key": "agent:main:test",
    }
    assert session_key_from_headers(headers) == "agent:main:test"
    del headers["X-OpenClaw-Session-Key"]
    assert session_key_from_headers(headers) == "aff"
    del headers["x-session-affinity"]
    assert session_key_from_headers(headers) == "sid"
    del headers["session_id"]
    assert session_key_from_headers(headers) == "req"
    assert session_key_from_headers({"x-session-affinity": "   "}) == DEFAULT_SESSION_KEY
    assert session_key_from_headers({}) == DEFAULT_SESSION_KEY


def test_session_keys_are_bounded_but_stay_distinct() -> None:
    long_a, long_b = "a" * 10_000, "a" * 9_999 + "b"
    key_a = session_key_from_headers({"x-session-affinity": long_a})
    key_b = session_key_from_headers({"x-session-affinity": long_b})
    assert len(key_a) < 100 and key_a != key_b
    odd = "../../etc/passwd\x00é"
    assert session_key_from_headers({"x-session-affinity": odd}) == odd


def test_hash_session_key_is_sha256_hex() -> None:
    digest = hash_session_key("agent:main:test")
    assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
    assert digest == hash_session_key("agent:main:test") != hash_session_key("agent:main:other")
    assert "agent" not in digest


def test_an_error_type_follows_its_status_unless_given() -> None:
    assert ApiError(503, "loading").info.type == "server_error"
    assert ApiError(500, "bug").info.type == "server_error"
    assert ApiError(404, "no such session").info.type == "invalid_request_error"
    assert ApiError(401, "wrong key", type="authentication_error").info.type == "authentication_error"
