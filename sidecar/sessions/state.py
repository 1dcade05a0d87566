"""A session's state: its cache and the history that reproduces it exactly.

The history is replayable: the tokens, how each run of tokens was written (segments) and the
memory-snippet writes. With it the KV cache can be dropped (eviction, restart) and
rebuilt, and a rollback can cut the history at any safe offset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

SegmentKind = Literal["write", "read", "messages", "plain"]

# A key has a session in each mode: δ on, then δ off (base).
MODES: tuple[bool, bool] = (True, False)


def mode_name(delta: bool) -> str:
    """How answers, logs and file names name a session's mode."""
    return "delta" if delta else "base"


def file_stem(key_hash: str, delta: bool) -> str:
    """A session's file name without extension: the key's hash and its mode."""
    return f"{key_hash}.{mode_name(delta)}"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) written one way: token writes, read-only, one message-mean call, or δ off."""

    start: int
    end: int
    kind: SegmentKind
    message_ids: tuple[int, ...] = ()  # per token, for "messages" segments

    def cut(self, offset: int) -> "Segment":
        """This segment ending at `offset` (start < offset < end)."""
        ids = self.message_ids[: offset - self.start] if self.message_ids else ()
        return Segment(self.start, offset, self.kind, ids)


@dataclass(frozen=True)
class SnippetWrite:
    """Memory snippets written into the δ-state at `offset` (no KV): their digest, tokens and count."""

    offset: int
    digest: str
    tokens: tuple[int, ...]
    count: int


@dataclass
class Session:
    """One conversation's cache and the history that reproduces it."""

    key_hash: str
    delta: bool
    tokens: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    snippet_writes: list[SnippetWrite] = field(default_factory=list)
    cache: list[Any] | None = None
    # δ-states read from disk, until the cache is rebuilt: after the whole history, and after the
    # first `offset` tokens for each checkpoint offset (see sidecar/sessions/replay_check.py).
    saved_states: list[Any] | None = None
    saved_checkpoints: dict[int, list[Any]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    turns: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0

    @property
    def mode(self) -> str:
        """The session's mode: "delta" or "base"."""
        return mode_name(self.delta)

    @property
    def file_stem(self) -> str:
        """The session's file name without extension: the key's hash and its mode."""
        return file_stem(self.key_hash, self.delta)

    @property
    def kv_bytes(self) -> int:
        """Bytes held by this session's cache (0 once evicted)."""
        return sum(c.nbytes for c in self.cache) if self.cache else 0

    def drop_cache(self) -> None:
        """Forget the KV cache; it is rebuilt from the history at the session's next turn."""
        self.cache = None

    def adopt(self, rebuilt: "Session") -> None:
        """Take the history and cache of a rebuilt copy (its δ-states now live in the cache)."""
        self.tokens, self.segments, self.snippet_writes = rebuilt.tokens, rebuilt.segments, rebuilt.snippet_writes
        self.cache, self.saved_states, self.saved_checkpoints = rebuilt.cache, None, {}
        self.prefilled_tokens += rebuilt.prefilled_tokens

    def safe_offset(self, offset: int) -> int:
        """The largest offset ≤ `offset` where the history can be cut (never inside a message-mean write)."""
        for seg in self.segments:
            if seg.kind == "messages" and seg.start < offset < seg.end:
                ids = seg.message_ids
                i = offset - seg.start
                while i > 0 and ids[i - 1] == ids[i]:
                    i -= 1
                return seg.start + i
        return offset

    def cut_point(self, offset: int, restorable: Callable[[int], int]) -> int:
        """The largest offset ≤ `offset` that is safe (see safe_offset) and that the cache restores
        exactly (`restorable`: its δ record keeps states only at some offsets)."""
        while True:
            cut = restorable(self.safe_offset(offset))
            if cut == offset:
                return cut
            offset = cut

    def truncate(self, offset: int) -> None:
        """Forget everything after `offset` tokens (snippets written at `offset` stay)."""
        offset = min(offset, len(self.tokens))
        if self.cache is not None and offset < len(self.tokens):
            for layer in self.cache:
                layer.trim(len(self.tokens) - offset)
        del self.tokens[offset:]
        self.segments = [
            seg if seg.end <= offset else seg.cut(offset) for seg in self.segments if seg.start < offset
        ]
        self.snippet_writes = [c for c in self.snippet_writes if c.offset <= offset]

    def record(self, tokens: list[int], kind: SegmentKind, message_ids: tuple[int, ...] = ()) -> None:
        """Append tokens that were just written into the cache."""
        if not tokens:
            return
        start = len(self.tokens)
        self.tokens.extend(tokens)
        last = self.segments[-1] if self.segments else None
        # A memory write between two runs keeps them apart, so a replay can put it back between them.
        context_here = bool(self.snippet_writes) and self.snippet_writes[-1].offset == start
        if last is not None and last.kind == kind and kind != "messages" and not context_here:
            self.segments[-1] = Segment(last.start, len(self.tokens), kind)
        else:
            self.segments.append(Segment(start, len(self.tokens), kind, message_ids))
