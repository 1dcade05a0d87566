"""What the serving layer hands the engine, and what the engine streams back.

The HTTP side (sidecar/server/) only speaks these types; the engine (sidecar/engine/) only speaks
these types. Neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Union

Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ChatMessage:
    """One chat message, normalised: content is plain text, tool calls in OpenAI shape."""

    role: Role
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ChatJob:
    """One chat completion to run in a session."""

    key_hash: str  # the session key's hash (sidecar/sessions/keys.py): the engine never sees the key
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    tools: tuple[dict[str, Any], ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    snippets: tuple[str, ...] = ()
    delta_enabled: bool = True


@dataclass(frozen=True)
class PromptDone:
    """Sent once, when the prompt is in the cache and decoding starts."""

    prompt_tokens: int
    cached_tokens: int
    snippets_written: int


@dataclass(frozen=True)
class TextDelta:
    """New text (already cut at a stop string; may be empty for a held-back token)."""

    text: str


# Why an answer ended: a stop (EOS or a stop string), the length limit, or the client left.
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Finished:
    """The last event of a job."""

    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The job could not run; `message` is safe to show to the client."""

    message: str
    code: str = "engine_error"
    status: int = 500


EngineEvent = Union[PromptDone, TextDelta, Finished, Failed]


class EngineError(Exception):
    """A session call that failed for a reason safe to show the client (message, status, code)."""

    def __init__(self, message: str, status: int = 400, code: str = "session_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ToolCallFormat:
    """How the model writes tool calls in its text (from mlx-lm's tool parsers)."""

    start: str
    end: str
    # The module under mlx_lm.tool_parsers whose parse_tool_call reads a block's inside
    # (mlx-lm's tokenizer wrapper: tokenizer.tool_parser.__module__ ends with it).
    parser: str = "json_tools"


@dataclass
class EngineInfo:
    """Static facts for /health and /v1/models."""

    model_id: str
    context_window: int
    adapter: dict[str, Any] | None
    backend: dict[str, Any]
    tool_call_format: ToolCallFormat | None
    extra: dict[str, Any] = field(default_factory=dict)


class JobStream(Protocol):
    """A submitted job: iterate its events; cancel it when the client goes away (the engine's is
    scheduler.JobChannel)."""

    def __aiter__(self) -> "JobStream": ...

    async def __anext__(self) -> EngineEvent: ...

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the serving layer needs from the engine."""

    info: EngineInfo

    def submit(self, job: ChatJob) -> JobStream: ...

    async def health(self) -> dict[str, Any]: ...

    # Sessions are named by their key's hash, as everywhere past the HTTP layer.
    async def reset_session(self, key_hash: str) -> bool: ...

    async def session_stats(self, key_hash: str) -> dict[str, Any] | None: ...

    async def save_session(self, key_hash: str) -> dict[str, Any]: ...

    async def load_session(self, key_hash: str) -> dict[str, Any]: ...

    async def close(self) -> None:
        """Stop the generation thread and persist sessions; called once when the server shuts down."""
