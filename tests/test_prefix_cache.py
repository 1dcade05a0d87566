"""Sessions share the KV and δ-state of a common system prompt; results equal a full prefill."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_support import SYSTEM, job, one_shot_states, run, session_of

from sidecar.delta.api import delta_states
from sidecar.engine.engine import Engine
from sidecar.engine.prompts import message_spans, render_prompt

QUESTION = [("user", "what did we decide about the garden?")]
ROSES = ("the garden needs roses",)


def _answer(events: list[Any]) -> str:
    return "".join(getattr(e, "text", "") for e in events)


def _states(engine: Engine, key: str) -> list[np.ndarray]:
    return [np.array(s) for s in delta_states(engine.model, session_of(engine, key).cache)]


def test_a_new_session_starts_from_the_shared_system_prompt_and_matches_a_full_prefill(engine_factory) -> None:
    warm = engine_factory()
    first = run(warm, job([("system", SYSTEM), *QUESTION], key="first", snippets=ROSES))
    second = run(warm, job([("system", SYSTEM), *QUESTION], key="second", snippets=ROSES, temperature=0.0))
    assert first[0].cached_tokens == 0
    boundary = warm.prefixes.stats()["tokens"]
    assert boundary > 0 and second[0].cached_tokens == boundary
    assert warm.prefixes.stats()["hits"] == 1

    cold = engine_factory(max_disk_bytes=0)  # same state dir: without its disk cache, nothing to start from
    alone = run(cold, job([("system", SYSTEM), *QUESTION], key="second", snippets=ROSES, temperature=0.0))
    assert alone[0].cached_tokens == 0
    assert _answer(second) == _answer(alone)  # same logits, greedy decoding: same text
    for a, b in zip(_states(warm, "second"), _states(cold, "second")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    session = session_of(warm, "second")
    for a, b in zip(delta_states(warm.model, session.cache), one_shot_states(warm, session)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    # The memory write lands right after the shared prefix, never inside it.
    assert [c.offset for c in session.snippet_writes] == [boundary]


def test_the_prefix_is_stored_once_and_counted_in_the_byte_bound(engine_factory) -> None:
    engine = engine_factory()
    for key in ("a", "b", "c"):
        run(engine, job([("system", SYSTEM), ("user", f"hello from {key}")], key=key))
    stats = asyncio.run(engine.health())["prefix_cache"]
    assert stats["entries"] == 1 and stats["hits"] == 2 and stats["hit_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert stats["bytes"] > 0

    tight = engine_factory(max_kv_bytes=stats["bytes"] + 1)
    run(tight, job([("system", SYSTEM), ("user", "hi")], key="a"))
    # The active session alone fills the bound: the shared entry is the one that gives way.
    health = asyncio.run(tight.health())
    assert health["prefix_cache"]["entries"] == 0
    assert health["sessions"]["kv_bytes"] <= stats["bytes"] * 2


def test_a_rewritten_system_prompt_reuses_what_still_matches(engine_factory) -> None:
    engine = engine_factory()
    run(engine, job([("system", SYSTEM + " Version one."), ("user", "hi")], key="old"))
    events = run(engine, job([("system", SYSTEM + " Version two, longer."), ("user", "hi")], key="new"))
    shared = events[0].cached_tokens
    assert 0 < shared < events[0].prompt_tokens
    session = session_of(engine, "new")
    for a, b in zip(delta_states(engine.model, session.cache), one_shot_states(engine, session)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_base_and_delta_sessions_do_not_share_prefixes(engine_factory) -> None:
    engine = engine_factory()
    run(engine, job([("system", SYSTEM), ("user", "hi")], key="d"))
    events = run(engine, job([("system", SYSTEM), ("user", "hi")], key="b", delta_enabled=False))
    assert events[0].cached_tokens == 0
    assert engine.prefixes.stats()["entries"] == 2
    plain = session_of(engine, "b", delta=False)
    assert all(seg.kind == "plain" for seg in plain.segments)


def test_a_template_without_a_newline_after_the_role_still_shares_its_system_prompt(
    engine_factory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    variant = tmp_path / "variant"
    shutil.copytree(tiny_model_dir, variant)
    template = variant / "chat_template.jinja"
    original = template.read_text()
    template.write_text(re.sub(r"(<\|im_start\|>(?:system|user|assistant))\\n", r"\1 ", original))
    assert template.read_text() != original
    engine = engine_factory(model=variant)
    messages = [("system", SYSTEM), *QUESTION]
    prompt = render_prompt(engine.tokenizer, job(messages).messages, ())
    assert "<|im_start|>system You are" in engine.tokenizer.decode(prompt)  # the role, a space, the text
    assert [span.role for span in message_spans(engine.tokenizer, prompt)] == ["system", "user", "assistant"]
    run(engine, job(messages, key="first"))
    second = run(engine, job(messages, key="second"))
    stats = engine.prefixes.stats()
    assert stats["hits"] == 1 and second[0].cached_tokens == stats["tokens"] > 0
