"""Write planning without MLX: what is written how, and the order in which a replay rebuilds a history."""

from __future__ import annotations

from sidecar.engine.prompts import Span
from sidecar.engine.write_plan import (
    ReplayStep,
    WritePolicy,
    history_limit,
    message_ids,
    plan_writes,
    planned_write,
    replay_steps,
    shared_boundary,
    snippet_offset,
    split_at,
)
from sidecar.sessions.state import Segment, SnippetWrite, common_prefix

# system [0, 10), user [10, 16), assistant [16, 20), user [20, 25), generation prompt [25, 28)
SPANS = [
    Span(0, 10, "system"),
    Span(10, 16, "user"),
    Span(16, 20, "assistant"),
    Span(20, 25, "user"),
    Span(25, 28, "assistant"),
]


def _write(offset: int) -> SnippetWrite:
    return SnippetWrite(offset, f"digest{offset}", (1, 2, 3), 1)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6], [5, 6, 7]) == 2


def test_token_writes_and_delta_off_need_no_spans() -> None:
    assert plan_writes(WritePolicy(delta=False), [], 3, 9) == [Segment(3, 9, "plain")]
    assert plan_writes(WritePolicy(delta=True), [], 3, 9) == [Segment(3, 9, "write")]
    assert plan_writes(WritePolicy(delta=True), [], 9, 9) == []
    assert not WritePolicy(delta=True).needs_spans and WritePolicy(delta=True, skip_system=True).needs_spans


def test_skip_system_reads_system_messages_without_writing_them() -> None:
    plan = plan_writes(WritePolicy(delta=True, skip_system=True), SPANS, 4, 27)
    assert plan == [Segment(4, 10, "read"), Segment(10, 27, "write")]


def test_message_mean_numbers_each_non_system_message_and_leaves_the_generation_prompt_unwritten() -> None:
    assert message_ids(SPANS, 8, 28) == (-1, -1) + (0,) * 6 + (1,) * 4 + (2,) * 5 + (-1,) * 3
    plan = plan_writes(WritePolicy(delta=True, message_mean=True), SPANS, 8, 28)
    assert [(s.start, s.end, s.kind) for s in plan] == [(8, 10, "read"), (10, 28, "messages")]
    assert plan[1].message_ids == message_ids(SPANS, 10, 28)


def test_the_shared_boundary_is_the_end_of_a_leading_system_message() -> None:
    assert shared_boundary(Span(0, 10, "system"), 28) == 10
    assert shared_boundary(Span(0, 10, "developer"), 8) == 7  # never the prompt's last token
    assert shared_boundary(Span(0, 10, "user"), 28) == 0
    assert shared_boundary(None, 28) == 0


def test_split_at_cuts_segments_and_their_message_ids() -> None:
    seg = Segment(0, 6, "messages", (0, 0, 1, 1, 2, 2))
    assert split_at([seg], [3, 6, 0]) == [Segment(0, 3, "messages", (0, 0, 1)), Segment(3, 6, "messages", (1, 2, 2))]


def test_a_replay_puts_every_snippet_write_back_between_the_tokens_it_came_between() -> None:
    segments = [Segment(0, 10, "write"), Segment(10, 20, "read"), Segment(20, 30, "write")]
    steps = replay_steps(segments, [_write(5), _write(20), _write(30)], skip=0)
    assert steps == [
        ReplayStep(segment=Segment(0, 5, "write")),
        ReplayStep(snippets=_write(5)),
        ReplayStep(segment=Segment(5, 10, "write")),
        ReplayStep(segment=Segment(10, 20, "read")),
        ReplayStep(snippets=_write(20)),
        ReplayStep(segment=Segment(20, 30, "write")),
        ReplayStep(snippets=_write(30)),
    ]


def test_a_replay_skips_what_a_shared_prefix_already_holds() -> None:
    segments = [Segment(0, 10, "read"), Segment(10, 30, "write")]
    steps = replay_steps(segments, [_write(12)], skip=10)
    assert steps == [
        ReplayStep(segment=Segment(10, 12, "write")),
        ReplayStep(snippets=_write(12)),
        ReplayStep(segment=Segment(12, 30, "write")),
    ]


def test_snippets_go_before_the_last_user_message_whatever_the_cache_held() -> None:
    assert snippet_offset(SPANS, 28) == 20
    assert snippet_offset([Span(0, 10, "system"), Span(10, 13, "assistant")], 13) == 10  # no user message
    assert snippet_offset([], 28) == 27  # not ChatML: before the last token


def test_a_history_keeps_only_the_memory_write_the_request_makes() -> None:
    ours = SnippetWrite(20, "ours", (1,), 1)
    # Nothing at or after the request's offset: the history is kept, cut to the offset for the write.
    assert history_limit([_write(10)], 24, 20, ours) == 20
    assert history_limit([_write(10)], 15, 20, ours) == 15
    # The same write already there (a retry): kept; another one (an abandoned turn's): cut before it.
    assert history_limit([_write(10), ours], 27, 20, ours) == 27
    assert history_limit([_write(10), _write(20)], 27, 20, ours) == 19
    assert history_limit([_write(20)], 27, 20, None) == 19  # a request without memory drops it too
    assert history_limit([_write(0)], 5, 0, None) == -1  # a write at 0 goes with everything
    # The same snippets as the latest write before the offset: in memory already, not written again.
    assert planned_write([SnippetWrite(10, "ours", (1,), 1)], ours) is None
    assert planned_write([_write(10)], ours) == ours
    assert planned_write([], None) is None
