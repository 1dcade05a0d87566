"""Turn streamed model text into content deltas and OpenAI tool calls.

The model writes calls as `<start>…<end>` blocks (Qwen3: `<tool_call>{"name", "arguments"}
</tool_call>`); the inside of a block is read by mlx-lm's parser for the model's format. Text is
fed as it is generated; content goes out as soon as it cannot be the start of a marker, and a
call goes out when its block closes.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from sidecar.engine.interface import ToolCallFormat

log = logging.getLogger(__name__)

ParseFn = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for the client."""

    text: str


@dataclass(frozen=True)
class ParsedToolCall:
    """A complete tool call, arguments as a JSON string (OpenAI shape)."""

    index: int
    id: str
    name: str
    arguments: str


ParserEvent = Union[ContentDelta, ParsedToolCall]


@functools.lru_cache(maxsize=None)
def load_tool_parser(name: str) -> ParseFn:
    """`parse_tool_call` of the mlx-lm tool parser module `name` (e.g. "json_tools")."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"not a tool parser name: {name!r}")
    module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    parse: ParseFn = module.parse_tool_call
    return parse


class ToolCallStreamParser:
    """Feed text deltas; get content deltas and tool calls back in order."""

    def __init__(self, fmt: ToolCallFormat, tools: Sequence[dict[str, Any]]) -> None:
        self._start = fmt.start
        self._end = fmt.end
        self._parse = load_tool_parser(fmt.parser)
        self._tools = list(tools)
        self._buffer = ""
        self._in_call = False
        self._calls = 0
        self._after_call = False

    @property
    def called(self) -> bool:
        """True once at least one tool call was emitted."""
        return self._calls > 0

    def feed(self, text: str) -> list[ParserEvent]:
        """Consume newly generated text."""
        self._buffer += text
        events: list[ParserEvent] = []
        while True:
            if self._in_call:
                end = self._buffer.find(self._end)
                if end < 0:
                    return events
                events.append(self._call_or_text(self._buffer[:end]))
                self._buffer = self._buffer[end + len(self._end) :]
                self._in_call = False
                continue
            start = self._buffer.find(self._start)
            if start >= 0:
                # Whitespace before a call only separates it from what came before.
                self._emit_content(events, self._buffer[:start].rstrip())
                self._buffer = self._buffer[start + len(self._start) :]
                self._in_call = True
                continue
            held = _held_back(self._buffer, self._start)
            self._emit_content(events, self._buffer[: len(self._buffer) - held])
            self._buffer = self._buffer[len(self._buffer) - held :]
            return events

    def finish(self) -> list[ParserEvent]:
        """Flush what is left when generation ends (an unclosed block is parsed if it can be)."""
        events: list[ParserEvent] = []
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            events.append(self._call_or_text(rest, closed=False))
        else:
            self._emit_content(events, rest)
        return events

    def _emit_content(self, events: list[ParserEvent], text: str) -> None:
        if self._after_call:
            # The newline after an end marker is layout, not something the model said.
            text = text.lstrip()
        if text:
            self._after_call = False
            events.append(ContentDelta(text))

    def _call_or_text(self, inside: str, closed: bool = True) -> ParserEvent:
        try:
            name, arguments = _normalise(self._parse(inside, self._tools))
        except Exception as exc:  # parsers raise anything from ValueError to KeyError
            log.warning("unparseable tool call (%s: %s); returned as text", type(exc).__name__, exc)
            return ContentDelta(self._start + inside + (self._end if closed else ""))
        call = ParsedToolCall(self._calls, f"call_{uuid.uuid4().hex[:24]}", name, arguments)
        self._calls += 1
        self._after_call = True
        return call


def _held_back(buffer: str, marker: str) -> int:
    """How many trailing characters to hold: whitespace, then a possible start of `marker`."""
    partial = 0
    for size in range(min(len(marker) - 1, len(buffer)), 0, -1):
        if buffer.endswith(marker[:size]):
            partial = size
            break
    body = buffer[: len(buffer) - partial]
    return partial + (len(body) - len(body.rstrip()))


def _normalise(parsed: Any) -> tuple[str, str]:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str) or not parsed["name"]:
        raise ValueError("no function name")
    arguments = parsed.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return parsed["name"], arguments
