"""Chat completions: an OpenAI request becomes one engine job, its events a JSON answer or SSE."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from common.settings import SidecarSettings
from sidecar.engine.interface import (
    ChatJob,
    ChatMessage,
    EngineLike,
    Failed,
    Finished,
    JobStream,
    PromptDone,
    TextDelta,
)
from sidecar.server.memory_input import MEMORY_HEADER, ParsedMemory, bounded_snippets, parse_memory_input
from sidecar.server.protocol import (
    ApiError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceDelta,
    ChoiceFinishReason,
    ChunkChoice,
    ErrorResponse,
    FunctionCallDelta,
    MessageContent,
    PromptTokensDetails,
    RequestMessage,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    ToolCallDelta,
    Usage,
    completion_id,
)
from sidecar.server.qmd import qmd_lookup
from sidecar.server.sse import SSE_DONE, EventStreamResponse, sse, until_disconnect
from sidecar.server.tool_calls import ContentDelta, ParsedToolCall, ParserEvent, ToolCallStreamParser
from sidecar.sessions.keys import hash_session_key, session_key_from_headers

log = logging.getLogger(__name__)

DELTA_MODE_HEADER = "x-delta-mode"
DeltaMode = Literal["base", "delta"]
MemorySource = Literal["request", "qmd", "none"]

# A client that goes away while a non-streamed answer is generated never sees a status, but the
# access log does; 499 is the usual "client closed request" code.
CLIENT_CLOSED_REQUEST = 499


@dataclass
class _Outcome:
    """What a job produced, folded from its events as they arrive: the one fold for JSON answers and streams."""

    parser: ToolCallStreamParser | None = None
    content: list[str] = field(default_factory=list)
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: ChoiceFinishReason = "stop"

    def fold(self, event: "Answered") -> list[ParserEvent]:
        """Take in one event; returns the text and tool-call pieces it adds (a stream sends them on)."""
        if isinstance(event, PromptDone):
            self.usage = _usage(event, 0)
            return []
        if isinstance(event, TextDelta):
            pieces = _text_events(self.parser, event.text)
        else:
            pieces = self.parser.finish() if self.parser else []
        for piece in pieces:
            if isinstance(piece, ContentDelta):
                self.content.append(piece.text)
            else:
                self.tool_calls.append(piece)
        if isinstance(event, Finished):
            self.usage = _with_completion(self.usage, event.completion_tokens)
            self.finish_reason = _finish_reason(event, self.tool_calls)
        return pieces


@dataclass(frozen=True)
class _Meta:
    """The identity of one answer, shared by all its chunks and its log line."""

    id: str
    created: int
    model: str
    session_hash: str
    started: float


class _JobFailed(Exception):
    """A job ended without an answer; carries what to tell the client."""

    def __init__(self, failure: Failed) -> None:
        super().__init__(failure.message)
        self.failure = failure


# The events of a job that ran as it should, as answers are built from them.
Answered = PromptDone | TextDelta | Finished

CANCELLED = Failed("the generation was cancelled by the server (it may be shutting down); retry", "cancelled", 503)
SHUTTING_DOWN = Failed("the server is shutting down and cut this answer off; retry", "server_shutting_down", 503)
NO_FINISH = Failed("the engine stopped without finishing the answer", "engine_error", 500)


class RunningAnswers:
    """The jobs whose answers are still running, so that a shutdown can end them all."""

    def __init__(self) -> None:
        self._streams: set[JobStream] = set()
        self.ending = False

    def add(self, stream: JobStream) -> None:
        """Track a submitted job (cancelled at once if the server is already ending answers)."""
        self._streams.add(stream)
        if self.ending:
            stream.cancel()

    def discard(self, stream: JobStream) -> None:
        """A job whose answer ended."""
        self._streams.discard(stream)

    def end_all(self) -> None:
        """Cancel every running job and any submitted later; their answers end with SHUTTING_DOWN."""
        self.ending = True
        for stream in list(self._streams):
            stream.cancel()


class ChatCompletionService:
    """Runs `POST /v1/chat/completions` against an engine."""

    def __init__(self, engine: EngineLike, settings: SidecarSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.answers = RunningAnswers()

    def end_answers(self) -> None:
        """End every answer still running: streams with an error event and [DONE], the others 503."""
        self.answers.end_all()

    async def create(self, request: ChatCompletionRequest, http: Request) -> Response:
        """Answer one request: JSON, or a token-by-token event stream."""
        self._check_model(request.model)
        mode = self._delta_mode(http.headers)
        key_hash = hash_session_key(session_key_from_headers(http.headers))  # the engine only sees the hash
        messages = tuple(to_chat_message(message) for message in request.messages)
        memory, source = await self._memory(request, http.headers, messages)
        tools, parse_tools = self._tools(request)
        job = ChatJob(
            key_hash=key_hash,
            messages=messages,
            max_tokens=self._max_tokens(request),
            tools=tools,
            stop=request.stop_strings(),
            snippets=memory.texts,
            delta_enabled=mode == "delta",
            **_sampling(request),
        )
        headers = _response_headers(key_hash, mode, memory, source)
        fmt = self.engine.info.tool_call_format
        parser = ToolCallStreamParser(fmt, tools) if parse_tools and fmt is not None else None
        stream = self.engine.submit(job)
        self.answers.add(stream)
        meta = _Meta(completion_id(), int(time.time()), request.model, key_hash, time.monotonic())
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = _sse_events(_checked(stream, self.answers), parser, meta, include_usage)
            return EventStreamResponse(events, on_disconnect=partial(_cancel, stream, meta), headers=headers)
        outcome = await until_disconnect(
            http.receive, _collect(_checked(stream, self.answers), parser), partial(_cancel, stream, meta)
        )
        if outcome is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        _log_done(meta, outcome)
        return JSONResponse(_response(meta, outcome).model_dump(), headers=headers)

    def _check_model(self, model: str) -> None:
        if model != self.engine.info.model_id:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.engine.info.model_id}'.",
                param="model",
                code="model_not_found",
            )

    def _delta_mode(self, headers: Mapping[str, str]) -> DeltaMode:
        asked = headers.get(DELTA_MODE_HEADER, "delta").strip().lower()
        if asked not in ("base", "delta"):
            raise ApiError(400, "X-Delta-Mode must be 'base' or 'delta'", param="X-Delta-Mode", code="invalid_header")
        # Without an adapter there is no δ to switch on; report what actually runs.
        return "delta" if asked == "delta" and self.engine.info.adapter is not None else "base"

    def _max_tokens(self, request: ChatCompletionRequest) -> int:
        asked = request.max_completion_tokens or request.max_tokens or self.settings.max_output_tokens
        return min(asked, self.settings.max_output_tokens)

    def _tools(self, request: ChatCompletionRequest) -> tuple[tuple[dict[str, Any], ...], bool]:
        tools = tuple(tool.model_dump(exclude_none=True) for tool in request.tools or ())
        choice = request.tool_choice
        if choice == "none":
            return (), False
        if choice is not None and not isinstance(choice, str):
            names = {tool["function"]["name"] for tool in tools}
            if choice.function.name not in names:
                message = f"tool_choice names '{choice.function.name}', which is not in tools"
                raise ApiError(400, message, param="tool_choice")
        return tools, bool(tools)

    async def _memory(
        self, request: ChatCompletionRequest, headers: Mapping[str, str], messages: Sequence[ChatMessage]
    ) -> tuple[ParsedMemory, MemorySource]:
        parsed = parse_memory_input(request.attention_state_values(), headers.get(MEMORY_HEADER))
        source_setting = self.settings.attention_state_source
        if source_setting == "none":
            ignored = ParsedMemory()
            if parsed.present:
                ignored.problems.append("hidden memory is turned off on this server; ignored")
            return ignored, "none"
        if parsed.present:
            return parsed, "request"
        if source_setting != "qmd":
            return parsed, "none"
        result = await qmd_lookup(self.settings.qmd, latest_user_text(messages))
        found = bounded_snippets(result.snippets)
        if result.reason:
            log.warning("qmd: %s", result.reason)
            if not result.snippets:
                found.problems.append("qmd found nothing usable (reason in the server log)")
        return found, "qmd"


def to_chat_message(message: RequestMessage) -> ChatMessage:
    """The engine's form of one request message: text joined, tool calls in OpenAI shape."""
    tool_calls = getattr(message, "tool_calls", None) or ()
    return ChatMessage(
        role=message.role,
        content=content_text(message.content),
        tool_calls=tuple(call.model_dump() for call in tool_calls),
        tool_call_id=getattr(message, "tool_call_id", None),
        name=getattr(message, "name", None),
    )


def content_text(content: MessageContent | None) -> str:
    """A message's text: a string as is, text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def latest_user_text(messages: Sequence[ChatMessage]) -> str:
    """The last run of consecutive user messages, joined (OpenClaw ends a turn with two)."""
    end = len(messages)
    while end > 0 and messages[end - 1].role != "user":
        end -= 1
    start = end
    while start > 0 and messages[start - 1].role == "user":
        start -= 1
    return "\n".join(message.content for message in messages[start:end])


def _sampling(request: ChatCompletionRequest) -> dict[str, Any]:
    # Only what the client set, so the engine's defaults hold otherwise.
    values = {"temperature": request.temperature, "top_p": request.top_p, "seed": request.seed}
    return {name: value for name, value in values.items() if value is not None}


def _response_headers(key_hash: str, mode: DeltaMode, memory: ParsedMemory, source: MemorySource) -> dict[str, str]:
    headers = {
        "X-Delta-Session": key_hash,
        "X-Delta-Mode": mode,
        "X-Delta-Attention-State-Count": str(len(memory.snippets)),
        "X-Delta-Attention-State-Source": source,
    }
    if memory.problems:
        headers["X-Delta-Attention-State-Warning"] = "; ".join(memory.problems)
    return headers


def _failure_error(failure: Failed) -> ApiError:
    return ApiError(failure.status, failure.message, code=failure.code)


async def _collect(events: AsyncIterator[Answered], parser: ToolCallStreamParser | None) -> _Outcome:
    """Run a job to the end for a non-streamed answer."""
    outcome = _Outcome(parser)
    try:
        async for event in events:
            outcome.fold(event)
    except _JobFailed as exc:
        raise _failure_error(exc.failure) from None
    return outcome


async def _checked(stream: JobStream, answers: RunningAnswers) -> AsyncIterator[Answered]:
    """The job's events up to Finished; a failure, a server-side cancel or no end at all raise."""
    try:
        async for event in stream:
            if isinstance(event, Failed):
                raise _JobFailed(event)
            if isinstance(event, Finished) and event.finish_reason == "cancelled":
                raise _JobFailed(SHUTTING_DOWN if answers.ending else CANCELLED)
            yield event
            if isinstance(event, Finished):
                return
        raise _JobFailed(NO_FINISH)
    finally:
        answers.discard(stream)


def _text_events(parser: ToolCallStreamParser | None, text: str) -> list[ParserEvent]:
    # The engine may send an empty delta for a held-back token; it is not worth a chunk.
    if parser is not None:
        return parser.feed(text)
    return [ContentDelta(text)] if text else []


def _finish_reason(event: Finished, tool_calls: Sequence[ParsedToolCall]) -> ChoiceFinishReason:
    if event.finish_reason == "stop" and tool_calls:
        return "tool_calls"
    return "length" if event.finish_reason == "length" else "stop"


def _usage(done: PromptDone, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=done.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def _with_completion(usage: Usage, completion_tokens: int) -> Usage:
    return usage.model_copy(
        update={"completion_tokens": completion_tokens, "total_tokens": usage.prompt_tokens + completion_tokens}
    )


def _response(meta: _Meta, outcome: _Outcome) -> ChatCompletionResponse:
    text = "".join(outcome.content)
    calls = [
        ResponseToolCall(id=call.id, function=ResponseFunctionCall(name=call.name, arguments=call.arguments))
        for call in outcome.tool_calls
    ]
    message = ResponseMessage(content=None if calls and not text else text, tool_calls=calls or None)
    return ChatCompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[Choice(message=message, finish_reason=outcome.finish_reason)],
        usage=outcome.usage,
    )


def _cancel(stream: JobStream, meta: _Meta) -> None:
    log.info("session %s: client left before the answer ended; job cancelled", meta.session_hash[:12])
    stream.cancel()


def _log_done(meta: _Meta, outcome: _Outcome) -> None:
    usage = outcome.usage
    log.info(
        "session %s: %d prompt tokens (%d cached), %d generated, finish %s, %.2f s",
        meta.session_hash[:12],
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
        usage.completion_tokens,
        outcome.finish_reason,
        time.monotonic() - meta.started,
    )


async def _sse_events(
    events: AsyncIterator[Answered], parser: ToolCallStreamParser | None, meta: _Meta, include_usage: bool
) -> AsyncIterator[str]:
    """The event stream of one answer: role first, then deltas, finish, usage, [DONE]."""

    def chunk(delta: ChoiceDelta, finish_reason: ChoiceFinishReason | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        body = ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice])
        return sse(body.model_dump_json())

    # Sent before the prompt is processed so that clients see the answer begin at once.
    yield chunk(ChoiceDelta(role="assistant", content=""))
    outcome = _Outcome(parser)
    try:
        async for event in events:
            for piece in outcome.fold(event):
                yield chunk(_delta(piece))
        yield chunk(ChoiceDelta(), outcome.finish_reason)
        if include_usage:
            usage_chunk = ChatCompletionChunk(
                id=meta.id, created=meta.created, model=meta.model, choices=[], usage=outcome.usage
            )
            yield sse(usage_chunk.model_dump_json())
        _log_done(meta, outcome)
    except _JobFailed as exc:
        yield sse(ErrorResponse(error=_failure_error(exc.failure).info).model_dump_json())
    except Exception:
        log.exception("session %s: stream failed", meta.session_hash[:12])
        error = ApiError(500, "internal error while generating", code="internal_error")
        yield sse(ErrorResponse(error=error.info).model_dump_json())
    yield SSE_DONE


def _delta(event: ParserEvent) -> ChoiceDelta:
    if isinstance(event, ContentDelta):
        return ChoiceDelta(content=event.text)
    call = ToolCallDelta(
        index=event.index,
        id=event.id,
        type="function",
        function=FunctionCallDelta(name=event.name, arguments=event.arguments),
    )
    return ChoiceDelta(tool_calls=[call])
