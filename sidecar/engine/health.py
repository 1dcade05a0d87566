"""The engine's part of /health: read from the event loop without waiting for the generation thread."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.engine.engine import Engine


def health_report(engine: "Engine", batch: dict[str, Any]) -> dict[str, Any]:
    """Model, sessions, caches, memory, jobs and batch figures (`batch`: the scheduler's stats)."""
    sessions = engine.store.sessions()
    counters = engine.counters.snapshot()
    return {
        "model": engine.info.model_id,
        "adapter": engine.info.adapter,
        "backend": engine.info.backend,
        "context_window": engine.info.context_window,
        "write_policy": engine.settings.write_policy,
        "sessions": {
            "in_memory": len(sessions),
            "with_kv": sum(1 for s in sessions if s.cache is not None),
            "kv_bytes": sum(s.kv_bytes for s in sessions),
            "max_sessions": engine.store.max_sessions,
            "max_kv_bytes": engine.store.max_kv_bytes,
            "persisted": engine.store.persisted_count(),
            "evictions": engine.store.evictions,
            "replay_checks": engine.replays.checks,
            "replay_mismatches": engine.replays.mismatches,
            **engine.store.save_report(),
        },
        "problems": engine.store.saves.problems() + engine.tiers.disk_problems(),
        "prefix_cache": engine.prefixes.stats(),
        "disk_cache": engine.tiers.disk_stats(),
        "memory": engine.memory.report(sessions),
        "jobs": {
            "completed": counters["jobs"],
            "failed": counters["failed"],
            "cancelled": counters["cancelled"],
            "queued": batch["waiting"],
            "prompt_tokens": counters["prompt_tokens"],
            "cached_tokens": counters["cached_tokens"],
            "refused_for_memory": counters["refused_for_memory"],
            "allocation_failures": counters["allocation_failures"],
        },
        "batch": {**batch, "prefill_chunk": engine.settings.prefill_chunk},
        "engine_uptime_s": round(time.time() - engine.started, 1),
    }
