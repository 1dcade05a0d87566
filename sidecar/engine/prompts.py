"""Chat messages to prompt tokens, and where each message sits in those tokens."""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from sidecar.engine.interface import ChatMessage

IM_START = "<|im_start|>"
SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")
UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


@dataclass(frozen=True)
class Span:
    """Tokens [start, end) of one rendered message; role "assistant" also covers the generation prompt."""

    start: int
    end: int
    role: str


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The dicts a Hugging Face chat template expects (tool-call arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        # Qwen templates know no `developer` role and would drop it; it plays the system part.
        role = "system" if m.role == "developer" else m.role
        item: dict[str, Any] = {"role": role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [_template_tool_call(call) for call in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def render_prompt(tokenizer: Any, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]]) -> list[int]:
    """Prompt token ids: the chat template with the generation prompt appended."""
    ids = tokenizer.apply_chat_template(
        template_messages(messages),
        tools=list(tools) or None,
        add_generation_prompt=True,
        tokenize=True,
    )
    return list(ids)


def render_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text (hidden memory snippets), without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class TokenFloor:
    """A lower bound on how many tokens texts become, from their length alone (no tokenizing).

    No token covers more characters of the normalised text than the vocabulary's longest token has
    (a byte-level token of n bytes covers at most n characters), so a text of C normalised
    characters is at least C / longest tokens.
    """

    longest: int
    normalize: Callable[[str], str]

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenFloor | None":
        """The floor for a fast (Rust) tokenizer; None when its normalisation cannot be applied here."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        form = type(backend.normalizer).__name__ if backend.normalizer is not None else None
        if form is not None and form not in UNICODE_FORMS:
            return None  # lowercasing, replacements...: lengths could change in ways not followed here
        # The same Unicode normalisation as the tokenizer's, done by the standard library (fast).
        normalize = functools.partial(unicodedata.normalize, form) if form else _unchanged
        return cls(longest=max(len(token) for token in tokenizer.get_vocab()), normalize=normalize)

    def __call__(self, texts: Iterable[str]) -> int:
        """The fewest tokens these texts can be."""
        return sum(len(self.normalize(text)) for text in texts) // self.longest


def _unchanged(text: str) -> str:
    return text


def message_spans(tokenizer: Any, tokens: Sequence[int]) -> list[Span]:
    """Message spans found from ChatML `<|im_start|>role` markers; [] when the template is not ChatML."""
    return list(_spans(tokenizer, tokens))


def message_starts(tokenizer: Any, tokens: Sequence[int]) -> list[int]:
    """Offsets of the ChatML `<|im_start|>` markers (where messages start); [] when the template is not ChatML."""
    start_id = message_start_id(tokenizer)
    return [] if start_id is None else [i for i, t in enumerate(tokens) if t == start_id]


def leading_span(tokenizer: Any, tokens: Sequence[int]) -> Span | None:
    """The first message span (its role decoded, the others not looked at)."""
    return next(_spans(tokenizer, tokens), None)


def _spans(tokenizer: Any, tokens: Sequence[int]) -> Iterator[Span]:
    starts = message_starts(tokenizer, tokens)
    if not starts:
        return
    if starts[0] > 0:
        yield Span(0, starts[0], "text")
    # A role is recognised by its own token ids right after the marker, whatever the template
    # writes after it (a newline, a space, a colon): no whitespace is looked for.
    known = sorted(((role, render_text(tokenizer, role)) for role in ROLES), key=lambda item: -len(item[1]))
    bounds = starts + [len(tokens)]
    for begin, end in zip(bounds, bounds[1:]):
        head = list(tokens[begin + 1 : min(end, begin + 8)])  # a role is a few tokens long
        role = next((role for role, ids in known if ids and head[: len(ids)] == ids), None)
        if role is None:  # another role: its first word, decoded from a few tokens
            role = (tokenizer.decode(head[:7]).split() or ["unknown"])[0]
        yield Span(begin, end, role)


def message_start_id(tokenizer: Any) -> int | None:
    """The id of ChatML's `<|im_start|>` token, or None when the tokenizer has none."""
    start_id = tokenizer.convert_tokens_to_ids(IM_START)
    return start_id if isinstance(start_id, int) and start_id != tokenizer.unk_token_id else None


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # the template renders a string argument verbatim
    return {**call, "function": function}
