"""Hidden memory input: snippets a request (or QMD) wants written into the session's δ-state.

Parsing is lenient (strings, objects with `text`/`content`/`snippet`, a single snippet or a list)
and bounded; whatever is skipped or cut is described in `problems`, which the server reports in
a response header instead of failing the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sidecar.server.protocol import json_text_problem

MEMORY_HEADER = "x-delta-attention-state"
TEXT_KEYS = ("text", "content", "snippet")

MAX_SNIPPETS = 32
MAX_SNIPPET_CHARS = 4_000
MAX_TOTAL_CHARS = 16_000


@dataclass(frozen=True)
class MemorySnippet:
    """One snippet of hidden memory."""

    text: str
    source: str | None = None
    score: float | None = None


@dataclass
class ParsedMemory:
    """Snippets in the order given, and what had to be dropped or cut to get them."""

    snippets: list[MemorySnippet] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    present: bool = False

    @property
    def texts(self) -> tuple[str, ...]:
        """The snippet texts, ready for a ChatJob."""
        return tuple(snippet.text for snippet in self.snippets)


def parse_memory_input(body_values: list[Any], header_value: str | None) -> ParsedMemory:
    """Merge the body's attention_state values and the header into one bounded list."""
    raw: list[Any] = list(body_values)
    problems: list[str] = []
    if header_value is not None and header_value.strip():
        try:
            raw.append(_decode_header(header_value))
        except (ValueError, RecursionError):
            problems.append("X-Delta-Attention-State header is not JSON; ignored")
    parsed = ParsedMemory(problems=problems, present=bool(raw))
    candidates: list[MemorySnippet] = []
    for value in raw:
        candidates.extend(memory_snippets(value, parsed.problems))
    _bound(_unique(candidates), parsed)
    return parsed


def memory_snippets(value: Any, problems: list[str]) -> list[MemorySnippet]:
    """The snippets in one value (a string, a snippet object, or a list of them); notes what is skipped."""
    values = value if isinstance(value, list) else [value]
    snippets: list[MemorySnippet] = []
    skipped = invalid = 0
    for entry in values:
        snippet = _snippet(entry)
        if snippet is None:
            skipped += 1
        elif json_text_problem(snippet.text, "snippet") is not None:
            invalid += 1  # half a surrogate pair: the tokenizer cannot take it
        else:
            snippets.append(snippet)
    if skipped:
        problems.append(f"{skipped} snippet(s) without text skipped")
    if invalid:
        problems.append(f"{invalid} snippet(s) that are not valid Unicode skipped")
    return snippets


def bounded_snippets(snippets: list[MemorySnippet]) -> ParsedMemory:
    """Apply the count and size bounds to already-parsed snippets (e.g. from QMD)."""
    parsed = ParsedMemory(present=bool(snippets))
    _bound(_unique(snippets), parsed)
    return parsed


def _decode_header(value: str) -> Any:
    # Starlette decodes header bytes as latin-1; a client sending UTF-8 JSON gets it back here.
    try:
        text = value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        text = value
    return json.loads(text)


def _snippet(entry: Any) -> MemorySnippet | None:
    if isinstance(entry, str):
        text = entry.strip()
        return MemorySnippet(text) if text else None
    if not isinstance(entry, dict):
        return None
    text = next((entry[key] for key in TEXT_KEYS if isinstance(entry.get(key), str)), "").strip()
    if not text:
        return None
    source = entry.get("source")
    score = entry.get("score")
    return MemorySnippet(
        text=text,
        source=source if isinstance(source, str) else None,
        score=float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
    )


def _unique(snippets: list[MemorySnippet]) -> list[MemorySnippet]:
    # The same snippet sent in two places (body and header) is written once.
    seen: set[str] = set()
    unique: list[MemorySnippet] = []
    for snippet in snippets:
        if snippet.text not in seen:
            seen.add(snippet.text)
            unique.append(snippet)
    return unique


def _bound(snippets: list[MemorySnippet], parsed: ParsedMemory) -> None:
    if len(snippets) > MAX_SNIPPETS:
        parsed.problems.append(f"{len(snippets) - MAX_SNIPPETS} snippet(s) over the limit of {MAX_SNIPPETS} dropped")
        snippets = snippets[:MAX_SNIPPETS]
    cut = 0
    total = 0
    for snippet in snippets:
        text = snippet.text
        if len(text) > MAX_SNIPPET_CHARS:
            text = text[:MAX_SNIPPET_CHARS]
            cut += 1
        room = MAX_TOTAL_CHARS - total
        if room <= 0:
            parsed.problems.append(f"total size over {MAX_TOTAL_CHARS} characters: later snippets dropped")
            break
        if len(text) > room:
            text = text[:room]
            cut += 1
        total += len(text)
        parsed.snippets.append(MemorySnippet(text, snippet.source, snippet.score))
    if cut:
        limits = f"{MAX_SNIPPET_CHARS} characters each, {MAX_TOTAL_CHARS} in all"
        parsed.problems.append(f"{cut} snippet(s) cut to fit {limits}")
