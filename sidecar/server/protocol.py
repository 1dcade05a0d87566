"""The OpenAI chat-completions wire format the sidecar speaks (pydantic models).

Fields follow the order of the OpenAI API reference. Fields the sidecar does not act on are
not declared, so pydantic ignores them. Project extensions are fenced and commented.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    field_validator,
    model_serializer,
    model_validator,
)

# --------------------------------------------------------------------------- request

MAX_STOP_STRINGS = 16
# OpenClaw's tool schemas nest a few levels; the chat template renders them recursively, so a
# pathological depth must be refused here rather than blow the stack while rendering.
MAX_JSON_DEPTH = 64
# JSON may escape half of a UTF-16 surrogate pair ("\ud800"); such text cannot be tokenized.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
HIDDEN_MEMORY_FIELDS = ("attention_state", "attentionState", "delta_attention_state")


# Numbers and booleans are strict: JSON `true` is not 1, "yes" is not true, "NaN" is not a number.
StrictCount = Annotated[int, Field(strict=True, ge=1)]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class TextContentPart(BaseModel):
    """A `{type: "text", text}` content part; the only part type a text model can read."""

    type: Literal["text"]
    text: str


def _content_shape(value: Any) -> Any:
    # Checked before the union is tried, so that the error names the problem instead of the
    # first union member that failed ("content.str: Input should be a valid string").
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of {type: 'text', text} parts")
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = f"has type {kind!r}" if isinstance(kind, str) else "is not a {type: 'text', text} object"
            raise ValueError(f"part {i} {shown}: this model reads text parts only")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {i} has no 'text' string")
    return value


MessageContent = Annotated[Union[str, list[TextContentPart]], BeforeValidator(_content_shape)]


class FunctionCall(BaseModel):
    """The function a tool call names, with its arguments as a JSON string."""

    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    """A tool call in an assistant message of the history."""

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class DeveloperMessage(BaseModel):
    role: Literal["developer"]
    content: MessageContent
    name: str | None = None


class SystemMessage(BaseModel):
    role: Literal["system"]
    content: MessageContent
    name: str | None = None


class UserMessage(BaseModel):
    role: Literal["user"]
    content: MessageContent
    name: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: MessageContent | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(BaseModel):
    role: Literal["tool"]
    content: MessageContent
    tool_call_id: str | None = None


RequestMessage = Annotated[
    Union[DeveloperMessage, SystemMessage, UserMessage, AssistantMessage, ToolMessage],
    Field(discriminator="role"),
]


class FunctionDefinition(BaseModel):
    """A function the model may call."""

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDefinition(BaseModel):
    """A tool offered to the model; only function tools exist in chat completions."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


TOOL_CHOICE_MODES = ("none", "auto", "required")


def _tool_choice_shape(value: Any) -> Any:
    # As for content: say what is wrong rather than which union member failed first.
    if value is None or value in TOOL_CHOICE_MODES or _names_a_function(value):
        return value
    modes = ", ".join(TOOL_CHOICE_MODES)
    raise ValueError(f"must be one of {modes} or {{type: 'function', function: {{name}}}}")


def _names_a_function(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("type", "function") != "function":
        return False
    function = value.get("function")
    return isinstance(function, dict) and isinstance(function.get("name"), str)


ToolChoice = Annotated[
    Union[Literal["none", "auto", "required"], NamedToolChoice], BeforeValidator(_tool_choice_shape)
]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """A `POST /v1/chat/completions` body; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[RequestMessage] = Field(min_length=1)
    model: str
    max_completion_tokens: StrictCount | None = None
    max_tokens: StrictCount | None = None
    n: Annotated[int, Field(strict=True)] = 1
    seed: Annotated[int, Field(strict=True, ge=0, le=2**64 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0.0, le=2.0)] | None = None
    tool_choice: ToolChoice | None = None
    tools: list[ToolDefinition] | None = None
    top_p: Annotated[FiniteFloat, Field(gt=0.0, le=1.0)] | None = None

    # ---- project extensions ------------------------------------------------------------
    # Hidden memory snippets written into the session's δ-state instead of the prompt.
    # Three spellings are accepted because existing clients use all three; the shapes are
    # parsed leniently by sidecar/server/memory_input.py, so they are untyped here.
    attention_state: Any = None
    attentionState: Any = None
    delta_attention_state: Any = None
    # ---- end of project extensions -----------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _tokenizable(cls, data: Any) -> Any:
        # Hidden memory is parsed leniently (bad items are skipped and reported), so it is not checked here.
        if isinstance(data, dict):
            for name, value in data.items():
                if name not in HIDDEN_MEMORY_FIELDS:
                    problem = json_text_problem(value, str(name))
                    if problem:
                        raise ValueError(problem)
        return data

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, stop: Any) -> Any:
        # Before the union is tried, so that `[""]` is refused as empty, not as "not a string".
        if stop is None:
            return stop
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        for i, item in enumerate(items):
            where = "the string" if isinstance(stop, str) else f"item {i}"
            if not isinstance(item, str):
                raise ValueError(f"{where} is not a string")
            if not item:
                raise ValueError(f"{where} is empty: a stop string needs at least one character")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whichever form the client sent."""
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)

    def attention_state_values(self) -> list[Any]:
        """The hidden-memory values present in the body, in a fixed order of spellings."""
        values = (self.attention_state, self.attentionState, self.delta_attention_state)
        return [value for value in values if value is not None]


def json_text_problem(value: Any, path: str) -> str | None:
    """What makes a parsed JSON value unusable as model input (too deep, invalid Unicode), or None."""
    pending: list[tuple[Any, str, int]] = [(value, path, 0)]
    while pending:
        item, where, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            shown = where if len(where) <= 80 else f"{where[:80]}…"
            return f"{shown} nests deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, dict):
            for key, child in item.items():
                pending.append((key, f"{where} (a key)", depth + 1))
                pending.append((child, f"{where}.{key}", depth + 1))
        elif isinstance(item, list):
            pending.extend((child, f"{where}.{i}", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str) and _LONE_SURROGATE.search(item):
            return f"{where} holds half of a UTF-16 surrogate pair: send valid Unicode text"
    return None


# --------------------------------------------------------------------------- response


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts; `cached_tokens` is how much of the prompt came from the session cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


# What an OpenAI choice reports; serving.py maps the engine's FinishReason (interface.py) to it.
ChoiceFinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: ChoiceFinishReason


def completion_id() -> str:
    """A fresh `chatcmpl-…` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    """The non-streaming answer."""

    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


# --------------------------------------------------------------------------- stream chunks


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChoiceDelta(BaseModel):
    """What a chunk adds; only the fields it carries are serialised."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    logprobs: None = None
    finish_reason: ChoiceFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed answer; the usage chunk has `choices: []`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --------------------------------------------------------------------------- models list


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "delta-mem-mlx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- errors

ErrorType = Literal["invalid_request_error", "authentication_error", "server_error"]


def error_type(status: int) -> ErrorType:
    """The OpenAI error type of an HTTP status (unless a more precise one applies, as for a wrong API key)."""
    return "server_error" if status >= 500 else "invalid_request_error"


class ErrorInfo(BaseModel):
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error, and the payload of an error event in a stream."""

    error: ErrorInfo


class ApiError(Exception):
    """A failure to report to the client as an ErrorResponse with an HTTP status (its type from the status
    unless given): the one way the server turns a status into an OpenAI error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type or error_type(status), param=param, code=code)

    def response_body(self) -> dict[str, Any]:
        """The JSON body for this error."""
        return ErrorResponse(error=self.info).model_dump()
