"""The one HTTP client of the product's own callers (selftest, eval, benchmarks) for the sidecar.

Stdlib only, and always through `common.health.open_local`, so a configured proxy never sees local
traffic. Streamed chats come back with TTFT, latency, token counts and the X-Delta-* headers.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import UserError
from common.health import open_local

SESSION_HEADER = "X-OpenClaw-Session-Key"
REQUEST_TIMEOUT_S = 900.0

# What to do about the errors a user can fix, by the sidecar's error code.
_HINTS = {
    "invalid_api_key": "pass --api-key (or set $DELTA_MEM_MLX_API_KEY)",
    "model_not_found": "pass --model-id with the id the sidecar serves",
    "context_length_exceeded": "keep fewer history messages in the prompt (--history-window N) or ask fewer questions",
    "model_loading": "wait until 'delta-mem-mlx status' says the sidecar is ready",
}

Role = Literal["system", "user", "assistant"]
# Hidden memory as the sidecar takes it: strings, or objects with `text` (+ `source`, `score`).
AttentionState = Sequence[str | dict[str, Any]]


class SidecarError(UserError, RuntimeError):
    """A request to the sidecar failed; the message says what failed and what to do."""

    # The HTTP status the sidecar answered with (None: no answer, or a failure inside a stream).
    http_status: int | None = None


@dataclass(frozen=True)
class Message:
    """One chat message as it is sent."""

    role: Role
    content: str


@dataclass(frozen=True)
class ChatReply:
    """One streamed answer: its text, timings, token counts and the sidecar's X-Delta-* headers."""

    text: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None
    headers: dict[str, str]
    chunks: int = 0

    @property
    def served_mode(self) -> str | None:
        """What the sidecar says actually ran: `base` or `delta`."""
        return self.headers.get("x-delta-mode")

    @property
    def snippet_count(self) -> int:
        """How many memory snippets the sidecar took for this request."""
        return int(self.headers.get("x-delta-attention-state-count", "0"))

    @property
    def snippet_source(self) -> str | None:
        """Where the sidecar says the snippets came from: `request`, `qmd` or `none`."""
        return self.headers.get("x-delta-attention-state-source")


@dataclass(frozen=True)
class StreamChunk:
    """What one SSE chunk of an answer carried."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any] | None


class ChatStream:
    """An answer being streamed: the X-Delta-* headers at once, then its chunks up to `data: [DONE]`.

    Only `data:` lines (and the blank lines between events) are accepted; an error event, a line that
    is not JSON or a broken connection raises SidecarError. `done` tells whether `[DONE]` arrived.
    """

    def __init__(self, response: Any, started: float):
        self.started = started
        self.headers = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("x-delta-")}
        self.done = False
        self._response = response

    def __iter__(self) -> Iterator[StreamChunk]:
        while not self.done:
            line = self._readline()
            if line is None:
                return
            if not line:
                continue
            if not line.startswith("data: "):
                raise SidecarError(f"the sidecar's answer stream sent a line that is not SSE data: {line[:80]!r}")
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                self.done = True
                return
            yield _chunk(payload)

    def _readline(self) -> str | None:
        try:
            raw = self._response.readline()
        except OSError as exc:
            raise SidecarError(
                f"the connection to the sidecar broke while it answered ({exc}); see 'delta-mem-mlx logs'"
            ) from None
        return raw.decode("utf-8", "replace").strip() if raw else None


class SidecarClient:
    """Chat completions, session statistics and resets, and read-only probes against one sidecar."""

    def __init__(self, base_url: str, api_key: str | None, model: str, timeout: float = REQUEST_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout

    def chat(
        self,
        messages: Sequence[Message],
        session_key: str,
        delta: bool,
        max_tokens: int,
        seed: int,
        attention_state: AttentionState | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatReply:
        """Stream one greedy (temperature 0) answer in the given session and δ mode, read to the end."""
        with self.stream(messages, session_key, delta, max_tokens, seed, attention_state, tools) as answer:
            return _collect(answer)

    @contextmanager
    def stream(
        self,
        messages: Sequence[Message],
        session_key: str,
        delta: bool,
        max_tokens: int,
        seed: int,
        attention_state: AttentionState | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Iterator[ChatStream]:
        """Open a greedy streamed answer; leaving the block early hangs up (the sidecar cancels the job)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": max_tokens,
            "temperature": 0,
            "seed": seed,
        }
        if attention_state is not None:
            body["attention_state"] = list(attention_state)
        if tools:
            body["tools"] = tools
        headers = {SESSION_HEADER: session_key, "X-Delta-Mode": "delta" if delta else "base"}
        started = time.perf_counter()
        # urllib sends "Connection: close", so closing the response drops the connection.
        with self._open("POST", "/v1/chat/completions", body, headers) as response:
            yield ChatStream(response, started)

    def session_stats(self, session_key: str) -> dict[str, Any]:
        """`GET /v1/session`: the statistics of one session, per δ mode."""
        return self._get_object("/v1/session", {SESSION_HEADER: session_key})

    def reset_session(self, session_key: str) -> None:
        """Forget a session on the sidecar (both δ modes), so no state or file is left behind."""
        with self._open("DELETE", "/v1/session", None, {SESSION_HEADER: session_key}) as response:
            response.read()

    def save_session(self, session_key: str) -> None:
        """`POST /v1/session/save`: persist a session now; returns once its KV is on disk too."""
        with self._open("POST", "/v1/session/save", None, {SESSION_HEADER: session_key}) as response:
            response.read()

    def get_json(self, path: str) -> dict[str, Any]:
        """GET a JSON object, e.g. `/health` or `/v1/models`."""
        return self._get_object(path, {})

    def served_model(self) -> str:
        """The id of the model the sidecar serves (from /v1/models)."""
        models = self.get_json("/v1/models").get("data") or []
        if not models or not isinstance(models[0], dict) or not models[0].get("id"):
            raise SidecarError(f"{self.base_url}/v1/models lists no model; pass --model-id")
        return str(models[0]["id"])

    def _get_object(self, path: str, headers: dict[str, str]) -> dict[str, Any]:
        with self._open("GET", path, None, headers) as response:
            data = _json(response.read())
        if not isinstance(data, dict):
            raise SidecarError(f"GET {self.base_url}{path} did not return a JSON object")
        return data

    def _open(self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=None if body is None else json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json", **headers},
            method=method,
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return open_local(request, self.timeout)
        except urllib.error.HTTPError as exc:
            failure = SidecarError(
                _failure(f"{method} {request.full_url} failed with HTTP {exc.code}", _error_body(exc.read()))
            )
            failure.http_status = exc.code
            raise failure from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SidecarError(
                f"cannot reach the sidecar at {self.base_url} ({reason}): start it with "
                "'delta-mem-mlx start-sidecar' or pass --url"
            ) from None


def _chunk(payload: str) -> StreamChunk:
    chunk = _json(payload)
    if not isinstance(chunk, dict):
        raise SidecarError(f"the sidecar's answer stream sent a line that is not a JSON object: {payload[:80]!r}")
    if "error" in chunk:
        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        raise SidecarError(_failure("the sidecar failed while answering", error))
    texts: list[str] = []
    finish: str | None = None
    for choice in chunk.get("choices") or []:
        texts.append((choice.get("delta") or {}).get("content") or "")
        finish = choice.get("finish_reason") or finish
    return StreamChunk("".join(texts), finish, chunk.get("usage"))


def _collect(answer: ChatStream) -> ChatReply:
    pieces: list[str] = []
    first: float | None = None
    usage: dict[str, Any] = {}
    finish: str | None = None
    chunks = 0
    for chunk in answer:
        chunks += 1
        if chunk.text:
            first = first if first is not None else time.perf_counter()
            pieces.append(chunk.text)
        finish = chunk.finish_reason or finish
        usage = chunk.usage or usage
    if not answer.done:
        raise SidecarError("the sidecar's answer stream ended early (no 'data: [DONE]'); see 'delta-mem-mlx logs'")
    total = time.perf_counter() - answer.started
    details = usage.get("prompt_tokens_details") or {}
    return ChatReply(
        text="".join(pieces),
        ttft_s=(first - answer.started) if first is not None else total,
        total_s=total,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens") or 0),
        finish_reason=finish,
        headers=answer.headers,
        chunks=chunks,
    )


def _json(raw: str | bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise SidecarError(f"the sidecar answered with something that is not JSON: {raw[:80]!r}") from None


def _error_body(raw: bytes) -> dict[str, Any]:
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _failure(what: str, error: dict[str, Any]) -> str:
    message = error.get("message") or "no message"
    hint = _HINTS.get(str(error.get("code")))
    return f"{what}: {message}" + (f"; {hint}" if hint else "")
