"""Hidden memory input: snippets a request (or QMD) wants written into the session's δ-state.

Parsing is lenient (strings, objects with `text`/`content`/`snippet`, a single item or a list)
and bounded; whatever is skipped or cut is described in `problems`, which the server reports in
a response header instead of failing the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sidecar.protocol import json_text_problem

MEMORY_HEADER = "x-delta-attention-state"
TEXT_KEYS = ("text", "content", "snippet")

MAX_ITEMS = 32
MAX_ITEM_CHARS = 4_000
MAX_TOTAL_CHARS = 16_000


@dataclass(frozen=True)
class MemoryItem:
    """One snippet of hidden memory."""

    text: str
    source: str | None = None
    score: float | None = None


@dataclass
class ParsedMemory:
    """Snippets in the order given, and what had to be dropped or cut to get them."""

    items: list[MemoryItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    present: bool = False

    @property
    def texts(self) -> tuple[str, ...]:
        """The snippet texts, ready for a ChatJob."""
        return tuple(item.text for item in self.items)


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
    candidates: list[MemoryItem] = []
    for value in raw:
        candidates.extend(memory_items(value, parsed.problems))
    _bound(_unique(candidates), parsed)
    return parsed


def memory_items(value: Any, problems: list[str]) -> list[MemoryItem]:
    """The items in one value (a string, an item object, or a list of them); notes what is skipped."""
    values = value if isinstance(value, list) else [value]
    items: list[MemoryItem] = []
    skipped = invalid = 0
    for entry in values:
        item = _item(entry)
        if item is None:
            skipped += 1
        elif json_text_problem(item.text, "snippet") is not None:
            invalid += 1  # half a surrogate pair: the tokenizer cannot take it
        else:
            items.append(item)
    if skipped:
        problems.append(f"{skipped} item(s) without text skipped")
    if invalid:
        problems.append(f"{invalid} item(s) that are not valid Unicode skipped")
    return items


def bounded_items(items: list[MemoryItem]) -> ParsedMemory:
    """Apply the count and size bounds to already-parsed items (e.g. from QMD)."""
    parsed = ParsedMemory(present=bool(items))
    _bound(_unique(items), parsed)
    return parsed


def _decode_header(value: str) -> Any:
    # Starlette decodes header bytes as latin-1; a client sending UTF-8 JSON gets it back here.
    try:
        text = value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        text = value
    return json.loads(text)


def _item(entry: Any) -> MemoryItem | None:
    if isinstance(entry, str):
        text = entry.strip()
        return MemoryItem(text) if text else None
    if not isinstance(entry, dict):
        return None
    text = next((entry[key] for key in TEXT_KEYS if isinstance(entry.get(key), str)), "").strip()
    if not text:
        return None
    source = entry.get("source")
    score = entry.get("score")
    return MemoryItem(
        text=text,
        source=source if isinstance(source, str) else None,
        score=float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
    )


def _unique(items: list[MemoryItem]) -> list[MemoryItem]:
    # The same snippet sent in two places (body and header) is written once.
    seen: set[str] = set()
    unique: list[MemoryItem] = []
    for item in items:
        if item.text not in seen:
            seen.add(item.text)
            unique.append(item)
    return unique


def _bound(items: list[MemoryItem], parsed: ParsedMemory) -> None:
    if len(items) > MAX_ITEMS:
        parsed.problems.append(f"{len(items) - MAX_ITEMS} item(s) over the limit of {MAX_ITEMS} dropped")
        items = items[:MAX_ITEMS]
    cut = 0
    total = 0
    for item in items:
        text = item.text
        if len(text) > MAX_ITEM_CHARS:
            text = text[:MAX_ITEM_CHARS]
            cut += 1
        room = MAX_TOTAL_CHARS - total
        if room <= 0:
            parsed.problems.append(f"total size over {MAX_TOTAL_CHARS} characters: later items dropped")
            break
        if len(text) > room:
            text = text[:room]
            cut += 1
        total += len(text)
        parsed.items.append(MemoryItem(text, item.source, item.score))
    if cut:
        parsed.problems.append(f"{cut} item(s) cut to fit {MAX_ITEM_CHARS} characters each, {MAX_TOTAL_CHARS} in all")
