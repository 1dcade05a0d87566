"""A corpus of malformed and hostile requests against a real server: 4xx with the OpenAI shape, never 5xx.

Every case says whether the server must refuse it (4xx, OpenAI error shape) or answer it (200:
odd but valid, e.g. hidden memory in strange shapes is skipped and reported, never an error).
A few requests break HTTP itself (NUL or non-ASCII bytes in a header); uvicorn's parser refuses
those before the app sees them, so they get its plain 400 and are counted apart.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import pytest
from reliability import (
    AUTH,
    health,
    is_openai_error,
    record_figures,
    start_capped_server,
    unexpected_files,
)
from server_process import KEY, MODEL, Server, stop_server

from sidecar.sessions.keys import hash_session_key

pytestmark = pytest.mark.e2e

Expect = Literal["refused", "answered"]
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    """One request of the corpus and what the server must do with it."""

    name: str
    expect: Expect
    body: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/v1/chat/completions"


def chat(**fields: Any) -> bytes:
    """A valid small chat body with some fields replaced (None removes a field)."""
    body: dict[str, Any] = {"model": MODEL, "messages": USER, "max_completion_tokens": 2}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode("utf-8")


def chat_with(*members: str) -> bytes:
    """A valid small chat body plus members written as raw JSON text (so \\ud800, NaN or depth stay as written)."""
    head = chat().decode("utf-8").removesuffix("}")
    return (head + "".join(f",{member}" for member in members) + "}").encode("utf-8")


def says(*messages: dict[str, Any]) -> bytes:
    """A chat body with these messages."""
    return chat(messages=list(messages))


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def calling(*calls: dict[str, Any]) -> dict[str, Any]:
    """An assistant message of the history that called tools."""
    return {"role": "assistant", "tool_calls": list(calls)}


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def tool(name: str = "read", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


def tool_params(raw_json: str) -> str:
    """A `tools` member whose one tool has these parameters (raw JSON)."""
    return '"tools":[{"type":"function","function":{"name":"f","parameters":' + raw_json + "}}]"


def refused(name: str, body: bytes | None = None, **kwargs: Any) -> Case:
    return Case(name, "refused", body, **kwargs)


def answered(name: str, body: bytes | None = None, **kwargs: Any) -> Case:
    return Case(name, "answered", body, **kwargs)


def corpus() -> list[Case]:
    """The requests, grouped by the categories of issue 7."""
    session = "X-OpenClaw-Session-Key"
    memory = "X-Delta-Attention-State"
    history_call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    spelled = {"delta_attention_state": [{"content": "c", "score": "high"}]}
    return [
        # invalid JSON
        refused("json: empty body", b""),
        refused("json: not JSON", b"hello"),
        refused("json: truncated", chat()[:-5]),
        refused("json: trailing garbage", chat() + b" }"),
        refused("json: single quotes", b"{'model': 'x'}"),
        refused("json: array", b"[]"),
        refused("json: null", b"null"),
        refused("json: string", b'"chat"'),
        refused("json: number", b"42"),
        refused("json: comments", b"// hi\n" + chat()),
        answered("json: UTF-8 BOM before the JSON", b"\xef\xbb\xbf" + chat()),
        # invalid UTF-8 and invalid Unicode
        refused("utf-8: invalid bytes in content", b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}'),
        refused("utf-8: latin-1 body", json.dumps({"model": "café"}, ensure_ascii=False).encode("latin-1")),
        refused("utf-8: lone surrogate in content", chat_with('"messages":[{"role":"user","content":"a\\ud800b"}]')),
        refused("utf-8: lone surrogate in a tool schema", chat_with(tool_params('{"\\udfff":1}'))),
        refused("utf-8: lone surrogate in stop", chat_with('"stop":"\\udc00"')),
        # missing fields
        refused("missing: messages", chat(messages=None)),
        refused("missing: model", chat(model=None)),
        refused("missing: role", says({"content": "hi"})),
        refused("missing: user content", says({"role": "user"})),
        refused("missing: tool call function", says(*USER, calling({"id": "1"}))),
        refused("missing: tool function name", chat(tools=[{"type": "function", "function": {"parameters": {}}}])),
        refused("missing: empty messages", says()),
        # wrong types everywhere
        refused("type: messages is a string", chat(messages="hi")),
        refused("type: messages is an object", chat(messages=user("hi"))),
        refused("type: message is a string", chat(messages=["hi"])),
        refused("type: model is a number", chat(model=7)),
        refused("type: model is a list", chat(model=[MODEL])),
        refused("type: content is a number", says(user(5))),
        refused("type: content is an object", says(user({"text": "hi"}))),
        refused("type: content part without type", says(user([{"text": "hi"}]))),
        refused("type: image content part", says(user([{"type": "image_url", "image_url": {"url": "x"}}]))),
        refused("type: role is a number", says({"role": 1, "content": "hi"})),
        refused("type: stream is a word", chat(stream="maybe")),
        refused("type: stream_options is a string", chat(stream=True, stream_options="usage")),
        refused("type: temperature is a word", chat(temperature="hot")),
        refused("type: max_tokens is fractional", chat(max_tokens=1.5)),
        refused("type: max_tokens is a word", chat(max_tokens="many")),
        refused("type: n is a word", chat(n="one")),
        refused("type: stop is a number", chat(stop=3)),
        refused("type: stop holds numbers", chat(stop=[1, 2])),
        refused("type: tools is an object", chat(tools={"type": "function"})),
        refused("type: tools holds strings", chat(tools=["read"])),
        refused("type: tool_choice is a number", chat(tools=[tool()], tool_choice=1)),
        refused("type: tool_choice is an unknown word", chat(tools=[tool()], tool_choice="always")),
        refused("type: seed is fractional", chat(seed=0.5)),
        refused("type: tool_calls is a string", says(*USER, {"role": "assistant", "tool_calls": "x"})),
        # unknown roles
        refused("role: robot", says({"role": "robot", "content": "hi"})),
        refused("role: empty", says({"role": "", "content": "hi"})),
        refused("role: upper case", says({"role": "USER", "content": "hi"})),
        refused("role: legacy function", says({"role": "function", "name": "f", "content": "{}"})),
        # absurd sampling and size values
        answered("absurd: max_completion_tokens 10**12 (clamped)", chat(max_completion_tokens=10**12)),
        answered("absurd: max_tokens 2**70 (clamped)", chat(max_completion_tokens=None, max_tokens=2**70)),
        refused("absurd: max_tokens 0", chat(max_completion_tokens=0)),
        refused("absurd: max_tokens negative", chat(max_completion_tokens=-5)),
        refused("absurd: temperature 1e308", chat(temperature=1e308)),
        refused("absurd: temperature negative", chat(temperature=-1)),
        refused("absurd: temperature NaN", chat_with('"temperature":NaN')),
        refused("absurd: temperature Infinity", chat_with('"temperature":Infinity')),
        answered("absurd: temperature 0 and top_p tiny", chat(temperature=0, top_p=1e-300)),
        refused("absurd: top_p 0", chat(top_p=0)),
        refused("absurd: top_p 2", chat(top_p=2)),
        refused("absurd: n 0", chat(n=0)),
        refused("absurd: n 2", chat(n=2)),
        refused("absurd: n 10**9", chat(n=10**9)),
        refused("absurd: seed negative", chat(seed=-1)),
        refused("absurd: seed 2**64", chat(seed=2**64)),
        refused("absurd: 17 stop strings", chat(stop=[f"s{i}" for i in range(17)])),
        refused("absurd: empty stop string", chat(stop="")),
        answered("absurd: stop strings with NUL and markers", chat(stop=["\u0000", "<tool_call>", "\n"])),
        # unknown model
        refused("model: another model", chat(model="gpt-4o")),
        refused("model: empty", chat(model="")),
        refused("model: 10 KB name", chat(model="m" * 10_000)),
        refused("model: NUL inside", chat(model=f"{MODEL}\u0000")),
        # empty and huge messages
        answered("size: empty content", says(user(""))),
        answered("size: empty content-part list", says(user([]))),
        answered("size: only a system message", says({"role": "system", "content": "x"})),
        answered("size: assistant without content", says(*USER, {"role": "assistant", "content": None})),
        answered("size: NUL and control characters", says(user("a\u0000b\u0007c\u001b[31m"))),
        answered("size: right-to-left and emoji", says(user("\u202eabc \U0001f600 \u200d"))),
        refused("size: 1 MB message over the context window", says(user("x " * 500_000))),
        refused("size: 5000 messages over the context window", chat(messages=USER * 5000)),
        refused("size: body over 8 MiB", says(user("x" * (9 * 1024 * 1024)))),
        answered("size: unknown fields are ignored", chat(logprobs=True, user="u", metadata={"a": 1})),
        # deep nesting
        refused("nesting: 100000-deep attention_state", chat_with(f'"attention_state":{"[" * 100_000}{"]" * 100_000}')),
        refused("nesting: 5000-deep tool parameters", chat_with(tool_params(nested(5000)))),
        refused("nesting: 500-deep tool parameters", chat_with(tool_params(nested(500)))),
        answered("nesting: 40-deep tool parameters", chat_with(tool_params(nested(40)))),
        refused("nesting: 500-deep unknown field", chat_with('"extra":' + nested(500))),
        # tools with broken schemas
        refused("tools: parameters is a string", chat(tools=[tool(parameters="oops")])),
        refused("tools: empty name", chat(tools=[tool(name="")])),
        refused("tools: 200-character name", chat(tools=[tool(name="f" * 200)])),
        refused("tools: unknown type", chat(tools=[{"type": "retrieval", "function": {"name": "f"}}])),
        refused("tools: choice names a missing tool", chat(tools=[tool()], tool_choice=tool("nope"))),
        refused("tools: 1000 tools over the context window", chat(tools=[tool("f", description="x" * 9)] * 1000)),
        answered("tools: schema with a $ref loop", chat(tools=[tool(parameters={"$ref": "#", "a": {"$ref": "#"}})])),
        answered("tools: parameters of odd JSON types", chat(tools=[tool(parameters={"type": 5, "items": [1, None]})])),
        answered("tools: tool_choice none with tools", chat(tools=[tool()], tool_choice="none")),
        answered("tools: history with unparsable tool arguments", says(*USER, calling(history_call), user("ok"))),
        answered("tools: tool message without an id", says(*USER, {"role": "tool", "content": "x"})),
        # attention_state in every odd shape (skipped and reported, never an error)
        answered("memory: header that is not JSON", chat(), headers={memory: "{not json"}),
        answered("memory: header with a lone surrogate", chat(), headers={memory: '["\\ud800"]'}),
        answered("memory: header with invalid UTF-8", chat(), headers={memory: b'["\xff\xfe"]'}),
        answered("memory: header with a number", chat(), headers={memory: "42"}),
        answered("memory: header 6 KB of snippets", chat(), headers={memory: json.dumps(["fact " * 10] * 100)}),
        answered("memory: 10000 items", chat(attention_state=[f"fact {i}" for i in range(10_000)])),
        answered("memory: one 1 MB item", chat(attention_state=["x" * 1_000_000])),
        answered("memory: nested objects", chat(attention_state=[{"text": {"a": {"b": "c"}}}, {"content": ["a"]}])),
        answered("memory: numbers and booleans", chat(attention_state=[1, 2.5, True, None])),
        answered("memory: a bare number", chat(attention_state=42)),
        answered("memory: list of lists", chat(attention_state=[["a", "b"], [["c"]]])),
        answered("memory: lone surrogate item", chat_with('"attention_state":["\\udfff ok"]')),
        answered("memory: all three spellings", chat(attention_state="a", attentionState={"snippet": "b"}, **spelled)),
        answered("memory: empty strings and whitespace", chat(attention_state=["", "   ", {"text": ""}])),
        # session keys
        answered("session: path separators", chat(), headers={session: "../../../../etc/passwd"}),
        answered("session: absolute path", chat(), headers={session: "/tmp/evil.session.npz"}),
        answered("session: backslashes and dots", chat(), headers={"x-session-affinity": "..\\..\\windows\\system32"}),
        answered("session: 10 KB key", chat(), headers={session: "k" * 10_000}),
        answered("session: shell metacharacters", chat(), headers={"session_id": "$(touch /tmp/x); `id` | rm -rf ~"}),
        answered("session: latin-1 bytes", chat(), headers={session: b"caf\xe9"}),
        answered("session: UTF-8 bytes", chat(), headers={session: "café ☕".encode()}),
        # other routes, methods, headers
        refused("http: GET on chat completions", method="GET"),
        refused("http: PUT on chat completions", chat(), method="PUT"),
        refused("http: unknown route", chat(), path="/v1/completions"),
        refused("http: path traversal in the URL", path="/v1/../../etc/passwd", method="GET"),
        refused("http: bad X-Delta-Mode", chat(), headers={"X-Delta-Mode": "turbo"}),
        refused("http: text/plain with a JSON body", chat(), headers={"Content-Type": "text/plain"}),
        refused("http: form-encoded body", b"model=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        refused("http: no session for stats", path="/v1/session", method="GET", headers={session: "never-seen"}),
        refused("http: load of an unknown session", path="/v1/session/load", headers={session: "never-seen"}),
    ]


# Requests that break HTTP framing: sent over a raw socket, refused by uvicorn's parser.
PROTOCOL_BREAKERS: dict[str, bytes] = {
    "header with a NUL byte": b"X-OpenClaw-Session-Key: a\x00b\r\n",
    "header with a newline inside": b"X-OpenClaw-Session-Key: a\rb\r\n",
    "header name with a space": b"Bad Header: x\r\n",
    "Content-Length that is not a number": b"Content-Length: ten\r\n",
}


def send_raw(server: Server, extra_header: bytes, body: bytes) -> int:
    """Send one hand-made HTTP/1.1 request; the status code of the answer."""
    url = urlsplit(server.base_url)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nConnection: close\r\n".encode()
        + extra_header
    )
    if b"Content-Length" not in extra_header:
        head += f"Content-Length: {len(body)}\r\n".encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + b"\r\n" + body)
        reply = b""
        while b"\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_capped_server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("bad-input"))
    yield running
    if running.process.poll() is None:
        stop_server(running)


def test_the_corpus_gets_4xx_or_an_answer_and_never_a_5xx(server: Server) -> None:
    cases = corpus()
    assert len({case.name for case in cases}) == len(cases)
    pid = server.process.pid
    started = health(server)["engine_uptime_s"]
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for case in cases:
            headers = {"Content-Type": "application/json", **AUTH, **case.headers}
            response = client.request(case.method, case.path, content=case.body, headers=headers)
            status = response.status_code
            if status >= 500:
                outcome = "5xx"
            elif 400 <= status < 500:
                outcome = "4xx OpenAI shape" if is_openai_error(response.content) else "4xx other"
            else:
                outcome = "answered"
            outcomes[outcome] += 1
            wanted = "4xx OpenAI shape" if case.expect == "refused" else "answered"
            if outcome != wanted or (outcome == "answered" and status != 200):
                wrong.append(f"{case.name}: {status} {response.text[:200]}")
    protocol_statuses = [send_raw(server, header, chat()) for header in PROTOCOL_BREAKERS.values()]
    after = health(server)
    restarts = 0 if server.process.poll() is None and server.process.pid == pid else 1
    log = server.log_text()
    record_figures(
        "bad_input",
        {
            "sent": len(cases) + len(PROTOCOL_BREAKERS),
            "answered_200": outcomes["answered"],
            "refused_4xx_openai_shape": outcomes["4xx OpenAI shape"],
            "refused_by_http_parser": sum(400 <= s < 500 for s in protocol_statuses),
            "other_4xx": outcomes["4xx other"],
            "server_errors_5xx": outcomes["5xx"],
            "server_restarts": restarts,
            "engine_jobs_failed": after["jobs"]["failed"],
        },
    )
    assert not wrong, "\n".join(wrong)
    assert all(400 <= status < 500 for status in protocol_statuses), protocol_statuses
    assert restarts == 0 and after["engine_uptime_s"] >= started
    assert after["jobs"]["failed"] == 0
    assert "Traceback" not in log


def test_session_keys_become_hashed_file_names_inside_the_state_dir(server: Server) -> None:
    state_dir = Path(server.log).parent / "state"
    keys = ["../../../../etc/passwd", "/tmp/evil.session.npz", "a/b\\c:d", "k" * 10_000]
    before = sorted(p.name for p in state_dir.parent.iterdir())
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for key in keys:
            headers = {**AUTH, "X-OpenClaw-Session-Key": key}
            response = client.post("/v1/chat/completions", json=json.loads(chat()), headers=headers)
            assert response.status_code == 200, (key[:40], response.text)
            expected = hash_session_key(key if len(key) <= 256 else f"sha256:{hash_session_key(key)}")
            assert response.headers["X-Delta-Session"] == expected
            assert (state_dir / f"{expected}.delta.session.npz").is_file()
    assert unexpected_files(state_dir) == []
    assert sorted(p.name for p in state_dir.parent.iterdir()) == before
    assert not Path("/tmp/evil.session.npz").exists()
    log = server.log_text()
    assert all(key not in log for key in keys[:3]) and "k" * 300 not in log
