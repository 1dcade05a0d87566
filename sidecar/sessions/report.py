"""What `GET /v1/session` says about a session: tokens, cache, reuse, memory writes, δ-state figures."""

from __future__ import annotations

from typing import Any

from sidecar.delta.api import delta_info, delta_state_stats, state_stats
from sidecar.sessions.state import Session


def describe_session(model: Any, session: Session) -> dict[str, Any]:
    """A JSON-ready report of one session (δ-state figures from its cache, else from its saved states)."""
    out: dict[str, Any] = {
        "tokens": len(session.tokens),
        "cached_kv_tokens": session.cache[0].offset if session.cache else 0,
        "kv_bytes": session.kv_bytes,
        "turns": session.turns,
        "prefilled_tokens": session.prefilled_tokens,
        "reused_tokens": session.reused_tokens,
        "memory_writes": sum(w.count for w in session.snippet_writes),
        "last_used": session.last_used,
    }
    if session.delta and session.cache is not None:
        out["delta_state"] = delta_state_stats(model, session.cache)
    elif session.saved_states:
        layers = delta_info(model).layers
        out["delta_state"] = [{"layer": layer, **state_stats(s)} for layer, s in zip(layers, session.saved_states)]
    return out

