"""Where a rendered prompt's messages sit: found once, on the render thread, for the generation thread to use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.engine.prompts import Span, message_spans, message_starts
from sidecar.engine.write_plan import shared_boundary


@dataclass(frozen=True)
class PromptLayout:
    """A prompt's tokens, its message spans and starts, and the prefix that sessions share."""

    tokens: list[int]
    spans: tuple[Span, ...]  # empty when the template is not ChatML
    starts: tuple[int, ...]  # offsets of the `<|im_start|>` markers
    boundary: int  # end of the leading system prompt (the shared prefix), or 0

    @property
    def kept_states(self) -> int:
        """δ-states the record keeps for this prompt: two per message (see prefill.Prefill._run_segment)."""
        return len(self.starts) * 2


def analyse_prompt(tokenizer: Any, tokens: Sequence[int]) -> PromptLayout:
    """The layout of a rendered prompt (one pass over it, on a render thread)."""
    spans = tuple(message_spans(tokenizer, tokens))
    return PromptLayout(
        tokens=list(tokens),
        spans=spans,
        starts=tuple(message_starts(tokenizer, tokens)),
        boundary=shared_boundary(spans[0] if spans else None, len(tokens)),
    )
