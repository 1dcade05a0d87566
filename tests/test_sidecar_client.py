"""The product's one sidecar client, against a local HTTP server that answers with canned bytes.

What it sends (headers, body), how it reads a stream (and refuses a broken one), that it never goes
through a configured proxy. The same client against a real sidecar: test_memory_eval.py, test_selftest.py
and test_reliability_load.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from installer.sidecar_client import Message, SidecarClient, SidecarError

MODEL = "canned-model"

STREAM = (
    b'data: {"choices": [{"delta": {"role": "assistant"}, "finish_reason": null}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "Mi"}, "finish_reason": null}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "so"}, "finish_reason": null}]}\n\n'
    b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2,'
    b' "prompt_tokens_details": {"cached_tokens": 8}}}\n\n'
    b"data: [DONE]\n\n"
)


@dataclass
class Canned:
    """What the canned server answers, and every request it received."""

    url: str
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def canned() -> Iterator[Canned]:
    """A local HTTP server that answers every request with the canned body, status and headers."""
    state = Canned("")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append(
                {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                 "body": json.loads(raw) if raw else None}
            )  # fmt: skip
            self.send_response(state.status)
            self.send_header("Content-Type", "text/event-stream")
            for name, value in state.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(state.body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    thread.join()


def test_a_chat_sends_what_the_sidecar_expects_and_reads_the_whole_stream(canned: Canned) -> None:
    canned.body = STREAM
    canned.headers = {"X-Delta-Mode": "delta", "X-Delta-Attention-State-Count": "1", "Server": "canned"}
    memory = ["The cat is called Miso.", {"text": "It fears the vacuum.", "source": "notes"}]
    reply = SidecarClient(canned.url, "KEY", MODEL).chat(
        [Message("system", "Be brief."), Message("user", "My cat?")], "s-1", False, 7, 3, memory
    )
    assert (reply.text, reply.finish_reason, reply.chunks) == ("Miso", "stop", 5)
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (12, 2, 8)
    assert reply.headers == {"x-delta-mode": "delta", "x-delta-attention-state-count": "1"}
    assert (reply.served_mode, reply.snippet_count) == ("delta", 1)
    assert 0 <= reply.ttft_s <= reply.total_s
    (sent,) = canned.requests
    assert (sent["method"], sent["path"]) == ("POST", "/v1/chat/completions")
    assert sent["headers"]["authorization"] == "Bearer KEY"
    assert sent["headers"]["x-openclaw-session-key"] == "s-1"
    assert sent["headers"]["x-delta-mode"] == "base"
    assert sent["body"] == {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My cat?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 7,
        "temperature": 0,
        "seed": 3,
        "attention_state": memory,
    }


def test_a_stream_left_early_yields_the_chunks_read_so_far(canned: Canned) -> None:
    canned.body = STREAM
    with SidecarClient(canned.url, None, MODEL).stream([Message("user", "hi")], "s", True, 4, 0) as answer:
        texts = [chunk.text for chunk in answer if chunk.text]
        assert answer.done
    assert texts == ["Mi", "so"]
    assert "authorization" not in canned.requests[0]["headers"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', "ended early"),
        (b"data: <html>\n\n", "not JSON"),
        (b"data: [1, 2]\n\n", "not a JSON object"),
        (b": keep-alive\n\ndata: [DONE]\n\n", "not SSE data: ': keep-alive'"),
        (b'data: {"error": {"message": "the prompt is 9000 tokens", "code": "context_length_exceeded"}}\n\n'
         b"data: [DONE]\n\n", "the prompt is 9000 tokens; keep fewer history messages"),
    ],
)
def test_a_broken_stream_is_one_clear_error(canned: Canned, body: bytes, message: str) -> None:
    canned.body = body
    with pytest.raises(SidecarError, match=message):
        SidecarClient(canned.url, None, MODEL).chat([Message("user", "hi")], "k", True, 4, 0)


def test_http_errors_and_bad_json_name_the_request_and_the_fix(canned: Canned) -> None:
    client = SidecarClient(canned.url, "wrong", MODEL)
    canned.status, canned.body = 401, b'{"error": {"message": "bad key", "code": "invalid_api_key"}}'
    with pytest.raises(SidecarError, match=r"GET .*/health failed with HTTP 401: bad key; pass --api-key"):
        client.get_json("/health")
    canned.status, canned.body = 200, b"not json"
    with pytest.raises(SidecarError, match="not JSON"):
        client.get_json("/health")
    with pytest.raises(SidecarError, match="cannot reach the sidecar at http://127.0.0.1:9 "):
        SidecarClient("http://127.0.0.1:9", None, MODEL, timeout=5).get_json("/health")


def test_session_routes_name_the_session_in_a_header(canned: Canned) -> None:
    client = SidecarClient(canned.url, None, MODEL)
    canned.body = b'{"session": "abc", "delta": {"delta_state": [{"norm": 1.0}]}}'
    assert client.session_stats("key with spaces")["delta"]["delta_state"] == [{"norm": 1.0}]
    client.reset_session("key with spaces")
    assert [(r["method"], r["path"], r["headers"]["x-openclaw-session-key"]) for r in canned.requests] == [
        ("GET", "/v1/session", "key with spaces"),
        ("DELETE", "/v1/session", "key with spaces"),
    ]


def test_a_configured_proxy_never_sees_local_traffic(canned: Canned) -> None:
    # In a fresh interpreter: urllib reads the proxy settings when it builds its default opener.
    # Port 9 (discard) is closed here, so a request sent to this "proxy" would fail.
    proxy = "http://127.0.0.1:9"
    env = {**os.environ, "http_proxy": proxy, "HTTP_PROXY": proxy, "all_proxy": proxy, "ALL_PROXY": proxy}
    env = {k: v for k, v in env.items() if k.lower() != "no_proxy"}
    canned.body = b'{"status": "ok"}'
    code = (
        "import sys; from installer.sidecar_client import SidecarClient as C; "
        "print(C(sys.argv[1], None, 'm').get_json('/health'))"
    )
    done = subprocess.run([sys.executable, "-c", code, canned.url], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "{'status': 'ok'}", done.stderr
