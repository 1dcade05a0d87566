"""The replay check: a session rebuilt from its saved history must reach the δ-states it saved.

An evicted or restored session gets its KV cache back by replaying its history. A chat API's next
request rarely shares the whole saved history (OpenClaw drops its internal-context message, an
answer re-tokenises differently), so a replay usually stops before the end. The session file
therefore keeps δ-states at checkpoints: the starts of its last messages, where the next request
diverges, besides the end. After a replay the state at the longest checkpoint it reached is
compared with the saved one. A mismatch means the history does not reproduce the state (a bug, or
a damaged file): it is logged with the session's hash and the layer, and counted. The replayed
state is kept, because it is what the session's tokens produce.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from sidecar.delta.api import delta_info, delta_states_at, restorable_offset
from sidecar.sessions.state import Session

log = logging.getLogger("sidecar.sessions.replay_check")

# Replays prefill in other chunks than the turns did (and decode steps become one prefill), so
# float32 sums come out in another order: differences of ~1e-6 are noise, not a wrong history.
TOLERANCE = 1e-3
# Message starts kept per session: a replay stops within the last few messages (36 layers × 8 × 8
# floats each for Qwen3-4B, 9 KB).
MAX_CHECKPOINTS = 16


def checkpoint_offsets(tokens: Sequence[int], message_start: int | None) -> list[int]:
    """Where a session keeps δ-states besides its end: the starts of its last messages."""
    if message_start is None:
        return []
    starts = [i for i, token in enumerate(tokens) if token == message_start and i > 0]
    return starts[-MAX_CHECKPOINTS:]


def checkpoint_states(model: Any, cache: list[Any], offsets: Sequence[int]) -> dict[int, list[np.ndarray]]:
    """The δ-states of every δ layer at each offset the cache kept: prefilled message starts are
    kept, but a `<|im_start|>` the model generated in an answer may fall between kept states."""
    kept = [offset for offset in offsets if restorable_offset(cache, offset) == offset]
    states = {offset: delta_states_at(model, cache, offset) for offset in kept}
    mx.eval(list(states.values()))
    return {offset: [np.array(s) for s in layers] for offset, layers in states.items()}


def saved_points(session: Session) -> dict[int, list[Any]]:
    """The δ-states a session read from disk, by offset: its checkpoints and its end."""
    points = dict(session.saved_checkpoints)
    if session.saved_states is not None:
        points[len(session.tokens)] = session.saved_states
    return points


@dataclass
class ReplayChecks:
    """Counts replays checked against a saved state, and those whose state did not match."""

    checks: int = 0
    mismatches: int = 0

    def check(self, model: Any, rebuilt: Session, saved: dict[int, list[Any]]) -> None:
        """Compare the rebuilt session's δ-states with the saved ones at the longest checkpoint it reached."""
        reached = [offset for offset in saved if offset <= len(rebuilt.tokens)]
        if not reached:
            return
        offset = max(reached)
        replayed = delta_states_at(model, rebuilt.cache, offset)
        self.checks += 1
        layers = delta_info(model).layers
        differing = [
            (layer, diff)
            for layer, now, before in zip(layers, replayed, saved[offset], strict=True)
            if (diff := float(mx.max(mx.abs(now - mx.array(before))))) > TOLERANCE
        ]
        for layer, diff in differing:
            log.warning(
                "session %s: replayed δ-state of layer %d differs by %.2g from the one saved at token %d; "
                "keeping the replayed state",
                rebuilt.key_hash[:12], layer, diff, offset,
            )
        self.mismatches += bool(differing)
