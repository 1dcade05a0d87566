"""The decode batch: every step feeds one token to every row in one forward pass and samples the next.

Steps are pipelined the way mlx-lm's generate_step is: a step is launched with the tokens the
previous step sampled (still being computed), then those tokens are read and streamed while the
step runs. So a token is in its row's cache by the time it is streamed, the session records it at
that moment (its history always matches its cache), and the token that ends an answer (EOS, a stop
string, the length limit) is in the cache too, as it was with generate_step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream

from sidecar.delta.batch import decode_rows
from sidecar.engine.interface import EngineEvent, FinishReason, TextDelta
from sidecar.engine.sampling import RowSampler, sample_rows
from sidecar.engine.scheduler import JobChannel, emit_all
from sidecar.engine.stop_strings import StopScanner
from sidecar.sessions.state import Session


@dataclass(eq=False)
class Row:
    """One answer being decoded: its session, its stream, its sampling and what it has produced."""

    session: Session
    stream: JobChannel
    max_tokens: int
    sampler: RowSampler | None
    detokenizer: Any
    scanner: StopScanner
    eos: frozenset[int]
    # The token the row feeds at its next step: the prompt's last token, then each sampled one.
    input: mx.array
    generated: int = 0
    prompt_tail: bool = field(default=True)  # the input is still the prompt's last token

    def take(self, token: int) -> tuple[str, FinishReason | None]:
        """One generated token: the text it lets the row send now, and the finish reason when it ends the answer."""
        self.generated += 1
        if token in self.eos:
            return "", "stop"
        self.detokenizer.add_token(token)
        text = self.scanner.feed(self.detokenizer.last_segment)
        if self.scanner.stopped:
            return text, "stop"
        if self.generated >= self.max_tokens:
            self.detokenizer.finalize()
            return text + self.scanner.feed(self.detokenizer.last_segment) + self.scanner.flush(), "length"
        return text, None


def step(model: Any, rows: list[Row]) -> list[tuple[Row, FinishReason]]:
    """Launch one step for all rows, then stream what the previous step sampled; the rows that finished."""
    inputs = mx.concatenate([row.input for row in rows])
    with mx.stream(generation_stream):
        caches = [row.session.cache for row in rows]
        logits = decode_rows(model, inputs, caches, [row.session.delta for row in rows])
        sampled = sample_rows(logits, [row.sampler for row in rows])
    mx.async_eval(sampled)
    finished: list[tuple[Row, FinishReason]] = []
    texts: list[tuple[JobChannel, EngineEvent]] = []
    for i, (row, token) in enumerate(zip(rows, inputs.tolist())):
        row.session.record([token], "write" if row.session.delta else "plain")
        row.input = sampled[i : i + 1]
        if row.prompt_tail:
            row.prompt_tail = False
            continue
        text, reason = row.take(token)
        if text:
            texts.append((row.stream, TextDelta(text)))
        if reason is not None:
            finished.append((row, reason))
    emit_all(texts)
    return finished
