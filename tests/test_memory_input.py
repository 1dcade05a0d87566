"""Hidden memory input: every accepted shape, the bounds, and bad input reported, not fatal."""

from __future__ import annotations

import json

from sidecar.server.memory_input import (
    MAX_SNIPPET_CHARS,
    MAX_SNIPPETS,
    MAX_TOTAL_CHARS,
    MemorySnippet,
    bounded_snippets,
    parse_memory_input,
)


def test_strings_and_objects_with_any_text_key() -> None:
    parsed = parse_memory_input(
        [
            [
                "The user has a cat.",
                {"text": "Cat is named Miso.", "source": "notes/pets.md", "score": 0.8},
                {"content": "User lives in Lisbon."},
                {"snippet": "User prefers tea.", "score": 0},
            ]
        ],
        None,
    )
    assert parsed.present
    assert parsed.texts == ("The user has a cat.", "Cat is named Miso.", "User lives in Lisbon.", "User prefers tea.")
    assert parsed.snippets[1] == MemorySnippet("Cat is named Miso.", "notes/pets.md", 0.8)
    assert parsed.snippets[3].score == 0.0
    assert parsed.problems == []


def test_single_string_or_object_without_a_list() -> None:
    assert parse_memory_input(["just one"], None).texts == ("just one",)
    assert parse_memory_input([{"text": "one object"}], None).texts == ("one object",)


def test_header_json_is_merged_after_body_and_duplicates_dropped() -> None:
    header = json.dumps([{"text": "from header"}, "same"])
    parsed = parse_memory_input([["same", "from body"]], header)
    assert parsed.texts == ("same", "from body", "from header")


def test_header_utf8_survives_latin1_decoding() -> None:
    # Starlette hands header bytes over decoded as latin-1.
    raw = json.dumps(["café ☕"], ensure_ascii=False).encode("utf-8").decode("latin-1")
    assert parse_memory_input([], raw).texts == ("café ☕",)


def test_non_json_header_is_reported_not_raised() -> None:
    parsed = parse_memory_input([], "this is {not json")
    assert parsed.texts == ()
    assert not parsed.present
    assert any("not JSON" in problem for problem in parsed.problems)


def test_deeply_nested_header_is_reported_not_raised() -> None:
    parsed = parse_memory_input([], "[" * 100_000)
    assert parsed.texts == () and parsed.problems


def test_odd_items_are_skipped_and_counted() -> None:
    parsed = parse_memory_input([[1, None, ["nested"], {"title": "no text"}, {"text": 5}, "  ", "kept"]], None)
    assert parsed.texts == ("kept",)
    assert parsed.problems == ["6 snippet(s) without text skipped"]


def test_count_bound_keeps_the_first_items() -> None:
    parsed = parse_memory_input([[f"item {i}" for i in range(MAX_SNIPPETS + 10)]], None)
    assert len(parsed.snippets) == MAX_SNIPPETS
    assert parsed.texts[0] == "item 0" and parsed.texts[-1] == f"item {MAX_SNIPPETS - 1}"
    assert any("10 snippet(s) over the limit" in problem for problem in parsed.problems)


def test_item_and_total_size_bounds() -> None:
    snippets = ["x" * (MAX_SNIPPET_CHARS * 3)] + [f"{i}" * MAX_SNIPPET_CHARS for i in range(9)]
    parsed = parse_memory_input([snippets], None)
    sizes = [len(text) for text in parsed.texts]
    assert max(sizes) <= MAX_SNIPPET_CHARS
    assert sum(sizes) <= MAX_TOTAL_CHARS
    assert sum(sizes) == MAX_TOTAL_CHARS  # filled up to the bound, not short of it
    assert any("cut" in problem for problem in parsed.problems)
    assert any("later snippets dropped" in problem for problem in parsed.problems)


def test_empty_list_is_present_but_empty() -> None:
    parsed = parse_memory_input([[]], None)
    assert parsed.present and parsed.texts == () and parsed.problems == []


def test_bounded_snippets_applies_the_same_bounds() -> None:
    items = [MemorySnippet(f"qmd {i}") for i in range(MAX_SNIPPETS + 1)] + [MemorySnippet("qmd 0")]
    parsed = bounded_snippets(items)
    assert len(parsed.snippets) == MAX_SNIPPETS and parsed.problems
