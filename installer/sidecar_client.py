"""A small streaming chat client for the sidecar (stdlib only): answers with TTFT, latency, headers, usage."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import UserError
from common.health import open_local
from installer.memory_eval.conversations import Message

SESSION_HEADER = "X-OpenClaw-Session-Key"
REQUEST_TIMEOUT_S = 900.0

# What to do about the errors a user can fix, by the sidecar's error code.
_HINTS = {
    "invalid_api_key": "pass --api-key (or set $DELTA_MEM_MLX_API_KEY)",
    "model_not_found": "pass --model-id with the id the sidecar serves",
    "context_length_exceeded": "keep fewer history messages in the prompt (--history-window N) or ask fewer questions",
    "model_loading": "wait until 'delta-mem-mlx status' says the sidecar is ready",
}


class SidecarError(UserError, RuntimeError):
    """A request to the sidecar failed; the message says what failed and what to do."""


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


class SidecarClient:
    """Chat completions, session resets and read-only probes against one sidecar."""

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
        attention_state: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatReply:
        """Stream one greedy (temperature 0) answer in the given session and δ mode."""
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
            body["attention_state"] = attention_state
        if tools:
            body["tools"] = tools
        headers = {SESSION_HEADER: session_key, "X-Delta-Mode": "delta" if delta else "base"}
        request = self._request("POST", "/v1/chat/completions", body, headers)
        started = time.perf_counter()
        with self._open(request) as response:
            delta_headers = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("x-delta-")}
            try:
                return _read_stream(response, started, delta_headers)
            except OSError as exc:
                raise SidecarError(
                    f"the connection to the sidecar broke while it answered ({exc}); see 'delta-mem-mlx logs'"
                ) from None

    def reset_session(self, session_key: str) -> None:
        """Forget a session on the sidecar (both δ modes), so no state or file is left behind."""
        with self._open(self._request("DELETE", "/v1/session", None, {SESSION_HEADER: session_key})) as response:
            response.read()

    def get_json(self, path: str) -> dict[str, Any]:
        """GET a JSON object, e.g. `/health` or `/v1/models`."""
        with self._open(self._request("GET", path, None, {})) as response:
            data = _json(response.read())
        if not isinstance(data, dict):
            raise SidecarError(f"GET {self.base_url}{path} did not return a JSON object")
        return data

    def served_model(self) -> str:
        """The id of the model the sidecar serves (from /v1/models)."""
        models = self.get_json("/v1/models").get("data") or []
        if not models or not isinstance(models[0], dict) or not models[0].get("id"):
            raise SidecarError(f"{self.base_url}/v1/models lists no model; pass --model-id")
        return str(models[0]["id"])

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> urllib.request.Request:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=None if body is None else json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json", **headers},
            method=method,
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        return request

    def _open(self, request: urllib.request.Request) -> Any:
        what = f"{request.get_method()} {request.full_url}"
        try:
            return open_local(request, self.timeout)
        except urllib.error.HTTPError as exc:
            error = _error_body(exc.read())
            raise SidecarError(_failure(f"{what} failed with HTTP {exc.code}", error)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SidecarError(
                f"cannot reach the sidecar at {self.base_url} ({reason}): start it with "
                "'delta-mem-mlx start-sidecar' or pass --url"
            ) from None


def _read_stream(response: Any, started: float, headers: dict[str, str]) -> ChatReply:
    pieces: list[str] = []
    first: float | None = None
    usage: dict[str, Any] = {}
    finish: str | None = None
    done = False
    for raw in response:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
            break
        chunk = _json(payload)
        if not isinstance(chunk, dict):
            raise SidecarError(f"the sidecar's answer stream sent a line that is not a JSON object: {payload[:80]!r}")
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise SidecarError(_failure("the sidecar failed while answering", error))
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                first = first if first is not None else time.perf_counter()
                pieces.append(text)
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    if not done:
        raise SidecarError("the sidecar's answer stream ended early (no 'data: [DONE]'); see 'delta-mem-mlx logs'")
    total = time.perf_counter() - started
    details = usage.get("prompt_tokens_details") or {}
    return ChatReply(
        text="".join(pieces),
        ttft_s=(first - started) if first is not None else total,
        total_s=total,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens") or 0),
        finish_reason=finish,
        headers=headers,
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
