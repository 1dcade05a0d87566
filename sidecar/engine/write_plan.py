"""Which tokens a request writes, rolls back or reuses: pure functions over token lists and spans.

Nothing here touches MLX. The engine asks these functions what to do and then does it: where the
session's history is cut back to, how each run of new tokens is written (token writes, read-only,
one message-mean call, or δ off), where a request's memory snippets are written, and in what order
a replay puts the memory-snippet writes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.engine.prompts import SYSTEM_ROLES, Span
from sidecar.sessions.state import Segment, SegmentKind, SnippetWrite


@dataclass(frozen=True)
class WritePolicy:
    """How δ writes: token by token, or one write per message (SSW); system messages written or read only."""

    delta: bool
    message_mean: bool = False
    skip_system: bool = False

    @property
    def needs_spans(self) -> bool:
        """True when the plan depends on where each message starts and ends."""
        return self.delta and (self.message_mean or self.skip_system)


@dataclass(frozen=True)
class ReplayStep:
    """One step of rebuilding a session: snippets written at this point, or a segment to prefill."""

    segment: Segment | None = None
    snippets: SnippetWrite | None = None


def plan_writes(policy: WritePolicy, spans: Sequence[Span], start: int, end: int) -> list[Segment]:
    """How to write prompt[start:end]: by mode, write policy and the adapter's write granularity."""
    if start >= end:
        return []
    if not policy.delta:
        return [Segment(start, end, "plain")]
    if not policy.needs_spans:
        return [Segment(start, end, "write")]
    # System messages are read, not written: the policy says so, and so does message-mean writing.
    segments = system_read_only(spans, start, end)
    if not policy.message_mean:
        return segments
    ids = message_ids(spans, start, end)
    return [
        Segment(seg.start, seg.end, "messages", ids[seg.start - start : seg.end - start])
        if seg.kind == "write"
        else seg
        for seg in segments
    ]


def message_ids(spans: Sequence[Span], start: int, end: int) -> tuple[int, ...]:
    """Per token: the message's number, or -1 for system messages and the generation prompt."""
    ids = [-1] * (end - start)
    number = 0
    for span in spans[:-1]:  # the last span is the generation prompt
        if span.role not in SYSTEM_ROLES:
            for t in range(max(span.start, start), min(span.end, end)):
                ids[t - start] = number
            number += 1
    return tuple(ids)


def system_read_only(spans: Sequence[Span], start: int, end: int) -> list[Segment]:
    """Segments that read but do not write system and developer messages."""
    out: list[Segment] = []
    for span in spans:
        a, b = max(span.start, start), min(span.end, end)
        if a < b:
            kind: SegmentKind = "read" if span.role in SYSTEM_ROLES else "write"
            if out and out[-1].kind == kind:
                out[-1] = Segment(out[-1].start, b, kind)
            else:
                out.append(Segment(a, b, kind))
    if not out or out[-1].end < end:
        out.append(Segment(out[-1].end if out else start, end, "write"))
    return out


def shared_boundary(leading: Span | None, prompt_length: int) -> int:
    """End of the leading system message (the prefix sessions share), or 0 when there is none."""
    if leading is not None and leading.start == 0 and leading.role in SYSTEM_ROLES:
        return min(leading.end, prompt_length - 1)
    return 0


def snippet_offset(spans: Sequence[Span], prompt_length: int) -> int:
    """Where a request writes its memory snippets: just before its last user message (before the
    generation prompt when it has none, before the last token when the template is not ChatML).
    It follows from the prompt alone, so the same request writes at the same place whatever the
    session's cache held."""
    users = [span.start for span in spans if span.role == "user"]
    offset = users[-1] if users else spans[-1].start if spans else prompt_length - 1
    return min(offset, prompt_length - 1)


def planned_write(kept: Sequence[SnippetWrite], wanted: SnippetWrite | None) -> SnippetWrite | None:
    """The memory write a request makes, given the writes of the history it keeps: none when the
    latest one before its offset holds the same snippets (a retried request, memory sent again)."""
    if wanted is None:
        return None
    before = [write for write in kept if write.offset < wanted.offset]
    return None if before and before[-1].digest == wanted.digest else wanted


def history_limit(writes: Sequence[SnippetWrite], limit: int, offset: int, planned: SnippetWrite | None) -> int:
    """How many tokens of a session's history a request keeps (at most `limit`, what its prompt
    shares): from `offset` (where the request writes its snippets) on, the history may hold no write
    but the one the request makes there, so an abandoned turn's memory never stays. A cut at an
    offset keeps the writes made there, so dropping a write means cutting before it (-1: before 0)."""
    for write in writes:
        if write.offset >= offset and write != planned:
            return min(limit, write.offset - 1)
    if planned is not None and planned not in writes:
        return min(limit, planned.offset)
    return limit


def split_at(segments: Sequence[Segment], offsets: Sequence[int]) -> list[Segment]:
    """Segments cut wherever a memory-snippet write happened inside one."""
    out: list[Segment] = []
    for seg in segments:
        for offset in sorted({o for o in offsets if seg.start < o < seg.end}):
            out.append(seg.cut(offset))
            ids = seg.message_ids[offset - seg.start :] if seg.message_ids else ()
            seg = Segment(offset, seg.end, seg.kind, ids)
        out.append(seg)
    return out


def replay_steps(segments: Sequence[Segment], writes: Sequence[SnippetWrite], skip: int) -> list[ReplayStep]:
    """The order in which a history is rebuilt after its first `skip` tokens (already in a shared
    prefix): every snippet write goes back exactly between the tokens it was written between."""
    pending = list(writes)
    steps: list[ReplayStep] = []
    for seg in split_at(segments, [w.offset for w in pending] + [skip]):
        if seg.end <= skip:
            continue
        while pending and pending[0].offset <= seg.start:
            steps.append(ReplayStep(snippets=pending.pop(0)))
        steps.append(ReplayStep(segment=seg))
    steps.extend(ReplayStep(snippets=w) for w in pending)
    return steps
