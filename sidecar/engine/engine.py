"""The generation engine: per-session caches, every token written exactly once, answers decoded together.

A request's prompt is rendered off the generation thread (sidecar/engine/rendering.py), then brought
into its session's cache a step at a time (sidecar/engine/prefill.py); its answer is then decoded in
the running batch with the other sessions' answers (sidecar/engine/decoding.py). The scheduler
(sidecar/engine/scheduler.py) decides what runs when; the memory keeper keeps the caches within the
KV budget (sidecar/engine/memory_keeper.py); session admin runs between two steps
(sidecar/engine/session_admin.py). This module assembles the parts and runs the decode side.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm

from common.kv_budget import KvShape
from common.settings import SidecarSettings
from sidecar.delta.api import (
    attach_delta_mem,
    attends_segments,
    check_kv_quantization,
    delta_info,
    wrap_plain_attention,
)
from sidecar.engine import decoding
from sidecar.engine.cache_tiers import CacheTiers, open_kv_disk
from sidecar.engine.decoding import Row
from sidecar.engine.failures import ENGINE_FAILED, OUT_OF_MEMORY, JobCounters, failures_told
from sidecar.engine.health import health_report
from sidecar.engine.interface import ChatJob, EngineInfo, Finished, FinishReason, ToolCallFormat
from sidecar.engine.memory_guard import KvGuard, effective_budget, is_allocation_failure
from sidecar.engine.memory_keeper import MemoryKeeper
from sidecar.engine.prefill import Prefill, Steps
from sidecar.engine.prompts import message_start_id
from sidecar.engine.rendering import Renderer
from sidecar.engine.scheduler import Admission, JobChannel, Scheduler
from sidecar.engine.session_admin import SessionAdmin
from sidecar.engine.write_plan import WritePolicy
from sidecar.kvcache.prefix_cache import PrefixCache
from sidecar.sessions.fingerprint import SessionFingerprint
from sidecar.sessions.replay_check import ReplayChecks
from sidecar.sessions.state import Session, mode_name
from sidecar.sessions.store import SessionStore

log = logging.getLogger(__name__)

PREFIX_ENTRIES = 8
# mlx-lm's generate_step frees MLX's buffer cache this often while decoding; so does the batch.
CLEAR_CACHE_STEPS = 256


def load_engine(settings: SidecarSettings) -> "Engine":
    """Load the model (and adapter) named by the settings and start the generation thread."""
    model, tokenizer = mlx_lm.load(settings.model_path)
    if settings.adapter_path:
        attach_delta_mem(model, settings.adapter_path)
    if settings.kv_bits is not None:
        check_kv_quantization(model, settings.kv_bits, settings.kv_group_size)
    return Engine(model, tokenizer, settings)


class Engine:
    """Runs chat jobs (answers decoded together in one batch) and session admin calls on one generation thread."""

    def __init__(self, model: Any, tokenizer: Any, settings: SidecarSettings):
        self.model = wrap_plain_attention(model)  # every layer attends the sidecar's way
        self.tokenizer = tokenizer
        self.settings = settings
        adapter = delta_info(model)
        self.info = EngineInfo(
            model_id=settings.model_id,
            context_window=settings.context_window,
            adapter=adapter.describe() if adapter else None,
            backend=_backend(),
            tool_call_format=_tool_call_format(tokenizer),
        )
        state_dir = Path(settings.state_dir) if settings.state_dir else None
        self.guard = _kv_guard(model, settings)
        self.store = SessionStore(settings.max_sessions, self.guard.budget, state_dir, _fingerprint(settings))
        self.prefixes = PrefixCache(
            max_entries=PREFIX_ENTRIES if settings.prefix_cache else 0,
            share=settings.share_prefix and attends_segments(model),
        )
        self.kv_disk = open_kv_disk(model, settings, self.store.fingerprint)
        self.counters = JobCounters()
        self.replays = ReplayChecks()
        self.started = time.time()
        policy = WritePolicy(
            delta=True,
            message_mean=adapter is not None and adapter.config.memory_write_granularity == "message_mean",
            skip_system=settings.write_policy == "skip-system",
        )

        # The scheduler comes last (its thread starts at once); the parts reach it through these.
        def answering() -> frozenset[str]:
            return self._scheduler.busy_keys()

        def rooms() -> dict[str, int]:
            return self._scheduler.busy_rooms()

        self.tiers = CacheTiers(model, settings, self.prefixes, self.kv_disk)
        self.memory = MemoryKeeper(self.guard, self.store, self.prefixes, settings, self.counters, rooms)
        self.admin = SessionAdmin(model, self.store, self.tiers, message_start_id(tokenizer), answering)
        self.prefiller = Prefill(
            model, tokenizer, settings, policy, store=self.store, guard=self.guard, memory=self.memory,
            tiers=self.tiers, replays=self.replays, counters=self.counters, finish=self._finish,
        )
        self.renderer = Renderer(tokenizer, settings.context_window, self.counters, self._ready)
        self._scheduler = Scheduler(self, settings.max_batch, kv_budget=self.guard.budget)

    # ---- the interface the serving layer uses -------------------------------------------

    def submit(self, job: ChatJob) -> JobChannel:
        """Put a chat job in line (its prompt is rendered meanwhile); iterate the returned stream for its events."""
        stream = JobChannel(asyncio.get_running_loop())
        admission = self._scheduler.enqueue(job.key_hash, job, stream)
        self.renderer.submit(admission)
        return stream

    async def health(self) -> dict[str, Any]:
        """Counters for /health, read without waiting for the generation thread."""
        return health_report(self, self._scheduler.stats())

    async def reset_session(self, key_hash: str) -> bool:
        """Forget a session (both modes), in memory and on disk; refused while it is answering."""
        return await self._scheduler.call(lambda: self.admin.reset(key_hash))

    async def session_stats(self, key_hash: str) -> dict[str, Any] | None:
        """Tokens, cache and δ-state figures of a session, or None if it does not exist."""
        return await self._scheduler.call(lambda: self.admin.stats(key_hash))

    async def save_session(self, key_hash: str) -> dict[str, Any]:
        """Write a session to the state dir now (and wait for its disk-cache chunks, off the generation thread)."""
        saved = await self._scheduler.call(lambda: self.admin.save(key_hash))
        await asyncio.to_thread(self.tiers.wait_for_writes, key_hash)
        return saved

    async def load_session(self, key_hash: str) -> dict[str, Any]:
        """Bring a session back from the state dir (its KV is rebuilt at its next turn)."""
        return await self._scheduler.call(lambda: self.admin.load(key_hash))

    async def close(self) -> None:
        """Save every session, let the started and waiting jobs finish, stop the threads (once)."""
        if not self._scheduler.alive:
            return
        await self._scheduler.call(self.admin.save_all)
        await self._scheduler.stop()
        self.renderer.close()
        await asyncio.to_thread(self.tiers.close)

    # ---- the pipeline the scheduler runs (on the generation thread) ---------------------------

    def prefill(self, admission: Admission) -> Steps[Row | None]:
        """The job's prompt, a step at a time; returns the row that decodes its answer, or None."""
        assert admission.layout is not None  # the scheduler starts rendered jobs only
        key = admission.key

        def out_of_memory(exc: BaseException) -> None:
            self.memory.after_allocation_failure(key, exc)

        with failures_told(admission.stream, key, self.counters, "chat job failed", out_of_memory=out_of_memory):
            return (yield from self.prefiller.prefill_job(admission.job, admission.layout, admission.stream))
        self.tiers.write_taken_chunks()  # a shared prefix built before the failure is kept
        return None

    def decode(self, rows: list[Row]) -> list[Row]:
        """One token for every row in one forward pass; finishes off and returns the rows that ended."""
        ended: list[tuple[Row, FinishReason]] = [(row, "cancelled") for row in rows if row.stream.cancelled]
        live = [row for row in rows if not row.stream.cancelled]
        failed: list[Row] = []
        try:
            if live:
                # Memory guard: room for the token every row adds in this step.
                self.memory.make_room_to_grow((len(row.session.tokens), 1) for row in live)
                ended += decoding.step(self.model, live)
        except Exception as exc:
            # The step may have written part of every row's caches: they are rebuilt from their
            # histories at their next turns, and every row of the step fails.
            out_of_memory = is_allocation_failure(exc)
            if out_of_memory:
                self.counters.add(allocation_failures=1)
                log.error("out of memory in a decode step of %d rows: %s", len(live), exc)
                mx.clear_cache()
            else:
                log.exception("a decode step failed (%d rows)", len(live))
            for row in live:
                row.session.drop_cache()
                self.counters.add(failed=1)
                row.stream.emit(OUT_OF_MEMORY if out_of_memory else ENGINE_FAILED)
            failed = live
        if self._scheduler.steps % CLEAR_CACHE_STEPS == 0:
            mx.clear_cache()
        for row, reason in ended:
            # A bug in one row's finishing fails that row only.
            with failures_told(row.stream, row.session.key_hash, self.counters, "finishing an answer failed"):
                self._finish(row.session, row.stream, reason, row.generated)
        return [row for row, _ in ended] + failed

    def room(self, admission: Admission) -> int:
        """Memory guard: the most KV a job will hold (prompt, whole answer, a new shared-prefix snapshot),
        as its prefill reserves it; the scheduler starts the job once it fits beside the running ones."""
        assert admission.layout is not None  # the scheduler asks for rendered jobs only
        mode = mode_name(admission.job.delta_enabled and delta_info(self.model) is not None)
        return self.memory.needed(*self.prefiller.request_size(admission.job, admission.layout, mode))

    def drop(self, admission: Admission) -> None:
        """End a job cancelled before it started."""
        self.counters.add(cancelled=1)
        admission.stream.emit(Finished("cancelled", 0))

    def _finish(self, session: Session, stream: JobChannel, reason: FinishReason, completion_tokens: int) -> None:
        session.turns += 1
        self.counters.add(**{"cancelled" if reason == "cancelled" else "jobs": 1})
        self.admin.persist(session)
        # Taken before the limits may evict the cache; written once the answer has ended.
        self.tiers.take_session(session)
        self.memory.enforce_limits()
        stream.emit(Finished(reason, completion_tokens))
        self.tiers.write_taken_chunks()

    def _ready(self, admission: Admission) -> None:
        self._scheduler.ready(admission)


def _kv_guard(model: Any, settings: SidecarSettings) -> KvGuard:
    """The arithmetic for this model's caches, and the budget in force (MLX's memory limit may lower it)."""
    shape = KvShape.from_dirs(settings.model_path, settings.adapter_path)
    budget = effective_budget(settings.max_kv_bytes, mx.get_memory_limit(), mx.get_active_memory())
    if budget < settings.max_kv_bytes:
        log.warning("KV budget %d bytes: MLX's memory limit leaves less than --max-kv-bytes", budget)
    return KvGuard(shape, budget, settings.kv_bits, settings.kv_group_size)


def _backend() -> dict[str, Any]:
    metal = mx.metal.is_available()
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": metal,
        "platform": f"{platform.system()} {platform.machine()}",
    }


def _tool_call_format(tokenizer: Any) -> ToolCallFormat | None:
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    parser = getattr(tokenizer.tool_parser, "__module__", "json_tools").rsplit(".", 1)[-1]
    return ToolCallFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, parser)


def _fingerprint(settings: SidecarSettings) -> SessionFingerprint | None:
    """What saved δ-states depend on (see sidecar/sessions/fingerprint.py); nothing to hash without a state dir."""
    if settings.state_dir is None:
        return None
    return SessionFingerprint(settings.model_id, settings.model_path, settings.adapter_path)
