"""Hidden memory input: every accepted shape, the bounds, and bad input reported, not fatal."""

from __future__ import annotations

import json

from sidecar.memory_input import (
    MAX_ITEM_CHARS,
    MAX_ITEMS,
    MAX_TOTAL_CHARS,
    MemoryItem,
    bounded_items,
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
    assert parsed.items[1] == MemoryItem("Cat is named Miso.", "notes/pets.md", 0.8)
    assert parsed.items[3].score == 0.0
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
    assert parsed.problems == ["6 item(s) without text skipped"]


def test_count_bound_keeps_the_first_items() -> None:
    parsed = parse_memory_input([[f"item {i}" for i in range(MAX_ITEMS + 10)]], None)
    assert len(parsed.items) == MAX_ITEMS
    assert parsed.texts[0] == "item 0" and parsed.texts[-1] == f"item {MAX_ITEMS - 1}"
    assert any("10 item(s) over the limit" in problem for problem in parsed.problems)


def test_item_and_total_size_bounds() -> None:
    parsed = parse_memory_input([["x" * (MAX_ITEM_CHARS * 3)] * 1 + [f"{i}" * MAX_ITEM_CHARS for i in range(9)]], None)
    sizes = [len(text) for text in parsed.texts]
    assert max(sizes) <= MAX_ITEM_CHARS
    assert sum(sizes) <= MAX_TOTAL_CHARS
    assert sum(sizes) == MAX_TOTAL_CHARS  # filled up to the bound, not short of it
    assert any("cut" in problem for problem in parsed.problems)
    assert any("later items dropped" in problem for problem in parsed.problems)


def test_empty_list_is_present_but_empty() -> None:
    parsed = parse_memory_input([[]], None)
    assert parsed.present and parsed.texts == () and parsed.problems == []


def test_bounded_items_applies_the_same_bounds() -> None:
    items = [MemoryItem(f"qmd {i}") for i in range(MAX_ITEMS + 1)] + [MemoryItem("qmd 0")]
    parsed = bounded_items(items)
    assert len(parsed.items) == MAX_ITEMS and parsed.problems
