"""The streaming tool-call parser, fed token by token the way the engine streams text."""

from __future__ import annotations

import json
import re

import pytest

from sidecar.engine.interface import ToolCallFormat
from sidecar.server.tool_calls import ContentDelta, ParsedToolCall, ParserEvent, ToolCallStreamParser, load_tool_parser

QWEN3 = ToolCallFormat("<tool_call>", "</tool_call>", "json_tools")
TOOLS = [
    {"type": "function", "function": {"name": "exec", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}},
]


def tokens(text: str) -> list[str]:
    """A plausible tokenisation: words, single punctuation marks and whitespace runs."""
    return re.findall(r"\w+|\s+|[^\w\s]", text)


def run(pieces: list[str], fmt: ToolCallFormat = QWEN3) -> list[ParserEvent]:
    parser = ToolCallStreamParser(fmt, TOOLS)
    events: list[ParserEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def content(events: list[ParserEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, ContentDelta))


def calls(events: list[ParserEvent]) -> list[ParsedToolCall]:
    return [event for event in events if isinstance(event, ParsedToolCall)]


CALL_EXEC = '<tool_call>\n{"name": "exec", "arguments": {"command": "ls -la /tmp"}}\n</tool_call>'
CALL_READ = '<tool_call>\n{"name": "read", "arguments": {"path": "notes.md"}}\n</tool_call>'


@pytest.mark.parametrize("split", [tokens, list], ids=["tokens", "characters"])
def test_content_then_two_calls(split) -> None:  # type: ignore[no-untyped-def]
    events = run(split("Let me check.\n\n" + CALL_EXEC + "\n" + CALL_READ))
    assert content(events) == "Let me check."
    found = calls(events)
    assert [(c.index, c.name) for c in found] == [(0, "exec"), (1, "read")]
    assert json.loads(found[0].arguments) == {"command": "ls -la /tmp"}
    assert json.loads(found[1].arguments) == {"path": "notes.md"}
    assert found[0].id.startswith("call_") and found[0].id != found[1].id


def test_no_partial_marker_ever_reaches_content() -> None:
    parser = ToolCallStreamParser(QWEN3, TOOLS)
    expected = "Sure <b>bold</b> < 3 and"
    text = expected + " <tool_call>\n" + '{"name": "exec", "arguments": {}}' + "\n</tool_call>"
    streamed = ""
    found: list[ParsedToolCall] = []
    for piece in text:
        events = parser.feed(piece)
        streamed += content(events)
        found += calls(events)
        # Whatever went out so far is part of the real text: no "<tool" ever leaked.
        assert expected.startswith(streamed)
    assert streamed == expected
    assert [call.name for call in found] == ["exec"]
    assert parser.finish() == []


def test_content_goes_out_as_soon_as_it_cannot_be_a_marker() -> None:
    parser = ToolCallStreamParser(QWEN3, TOOLS)
    assert parser.feed("Hello") == [ContentDelta("Hello")]
    assert parser.feed(" <") == []  # could be the start of <tool_call>
    assert parser.feed("3") == [ContentDelta(" <3")]
    assert parser.feed(" ") == []  # trailing whitespace waits: it may precede a call
    assert parser.feed("you") == [ContentDelta(" you")]
    assert parser.finish() == []


def test_plain_text_only() -> None:
    text = "No tools needed: 2 < 3, and <html> is fine.\n"
    events = run(tokens(text))
    assert calls(events) == [] and content(events) == text


def test_text_after_a_call_is_kept_without_the_layout_newline() -> None:
    events = run(tokens(CALL_EXEC + "\nDone."))
    assert [c.name for c in calls(events)] == ["exec"] and content(events) == "Done."


def test_unparseable_block_comes_back_as_text() -> None:
    broken = "<tool_call>\n{not json}\n</tool_call>"
    events = run(tokens("Try: " + broken))
    assert calls(events) == [] and content(events) == "Try:" + broken


def test_unclosed_block_at_the_end_is_parsed_if_complete_else_returned() -> None:
    complete = run(tokens('<tool_call>\n{"name": "read", "arguments": {"path": "a"}}\n'))
    assert [c.name for c in calls(complete)] == ["read"]
    cut = run(tokens('<tool_call>\n{"name": "read", "argu'))
    assert calls(cut) == [] and content(cut) == '<tool_call>\n{"name": "read", "argu'


def test_string_arguments_pass_through() -> None:
    events = run(['<tool_call>{"name": "exec", "arguments": "{\\"command\\": \\"pwd\\"}"}</tool_call>'])
    assert calls(events)[0].arguments == '{"command": "pwd"}'


def test_qwen3_coder_format_via_mlx_lm_parser() -> None:
    fmt = ToolCallFormat("<tool_call>", "</tool_call>", "qwen3_coder")
    block = "<tool_call>\n<function=exec>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>"
    events = run(tokens(block), fmt)
    assert [(c.name, json.loads(c.arguments)) for c in calls(events)] == [("exec", {"command": "ls"})]


def test_parser_names_are_checked() -> None:
    with pytest.raises(ValueError):
        load_tool_parser("../os")
    assert callable(load_tool_parser("json_tools"))
