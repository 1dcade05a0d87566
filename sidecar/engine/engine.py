"""The generation engine: per-session caches, every token written exactly once, answers decoded together.

A request's prompt is rendered off the generation thread, then compared with what its session
already holds; the cache is cut back to the longest common prefix (exact at any offset, see
sidecar/delta/cache.py), and only the rest of the prompt is prefilled, a chunk per step. Hidden-memory
snippets are written into the δ-state just before the request's last user message: a place that
follows from the request and the session's history, never from what the cache happened to hold.
Its answer is then decoded in the running batch with the other sessions' answers
(sidecar/engine/decoding.py); the scheduler (sidecar/engine/scheduler.py) decides what runs when.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import platform
import threading
import time
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import mlx_lm

from common.kv_budget import KvShape, kv_bits_name
from common.settings import SidecarSettings
from sidecar.delta.api import (
    attach_delta_mem,
    check_kv_quantization,
    delta_info,
    delta_record_nbytes,
    delta_states,
    make_cache,
    restorable_offset,
    set_delta_controls,
    write_context,
)
from sidecar.delta.cache_chunks import fill_cache
from sidecar.engine import decoding
from sidecar.engine.decoding import Row
from sidecar.engine.interface import (
    ChatJob,
    EngineError,
    EngineInfo,
    Failed,
    Finished,
    PromptDone,
    ToolCallFormat,
)
from sidecar.engine.memory_guard import (
    KvBudgetExceeded,
    KvGuard,
    answering_bytes,
    effective_budget,
    eviction_plan,
    is_allocation_failure,
)
from sidecar.engine.prompts import (
    TokenFloor,
    leading_span,
    message_spans,
    message_start_id,
    message_starts,
    render_prompt,
    render_text,
)
from sidecar.engine.sampling import row_sampler
from sidecar.engine.scheduler import Admission, Cancelled, JobStream, Scheduler
from sidecar.engine.stop_strings import StopScanner
from sidecar.engine.write_plan import (
    WritePolicy,
    history_limit,
    plan_writes,
    planned_write,
    replay_steps,
    shared_boundary,
    snippet_offset,
)
from sidecar.kvcache.disk_cache import KvDisk, PendingChunk, Restored
from sidecar.kvcache.prefix_cache import PrefixCache
from sidecar.sessions.fingerprint import SessionFingerprint
from sidecar.sessions.keys import hash_session_key
from sidecar.sessions.replay_check import ReplayChecks, checkpoint_offsets, checkpoint_states, saved_points
from sidecar.sessions.report import describe_session
from sidecar.sessions.state import Segment, Session, SnippetWrite, common_prefix
from sidecar.sessions.store import SessionStore, StateWriteError

log = logging.getLogger("sidecar.engine.engine")

T = TypeVar("T")
# The pipeline runs as generators: each `yield` ends one step (one forward pass), so the scheduler
# can run a decode step for the batch before the next one.
Steps = Generator[None, None, T]

PREFIX_ENTRIES = 8
# Prompts are rendered and tokenized on these threads, never on the generation thread, so a huge
# prompt being tokenized (seconds for megabytes) holds up no other session.
RENDER_THREADS = 4
# mlx-lm's generate_step frees MLX's buffer cache this often while decoding; so does the batch.
CLEAR_CACHE_STEPS = 256


ENGINE_FAILED = Failed("the engine failed while answering; see the server log", "engine_error", 500)
OUT_OF_MEMORY = Failed("the server ran out of memory for this request; it is healthy, retry", "out_of_memory", 503)


class PromptRefused(Exception):
    """A prompt that cannot run, with the failure to send its client."""

    def __init__(self, failure: Failed) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class _Counters:
    jobs: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    refused_for_memory: int = 0
    allocation_failures: int = 0
    # Render threads count failures too; every change goes through add().
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        """Add to counters by name."""
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


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
        self.model = model
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
        self.prefixes = PrefixCache(max_entries=PREFIX_ENTRIES if settings.prefix_cache else 0)
        self.kv_disk = _kv_disk(model, settings, self.store.fingerprint)
        self._disk_writes: list[PendingChunk | None] = []  # taken during a job, written once it has answered
        self.counters = _Counters()
        self.replays = ReplayChecks()
        self._message_start = message_start_id(tokenizer)
        self.started = time.time()
        self.policy = WritePolicy(
            delta=True,
            message_mean=adapter is not None and adapter.config.memory_write_granularity == "message_mean",
            skip_system=settings.write_policy == "skip-system",
        )
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._token_floor = TokenFloor.of(tokenizer)
        self._renderer = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="delta-mem-render")
        self._scheduler = Scheduler(self, settings.max_batch, kv_budget=self.guard.budget)

    # ---- the interface the serving layer uses -------------------------------------------

    def submit(self, job: ChatJob) -> JobStream:
        """Put a chat job in line (its prompt is rendered meanwhile); iterate the returned stream for its events."""
        stream = JobStream(asyncio.get_running_loop())
        admission = self._scheduler.enqueue(hash_session_key(job.session_key), job, stream)
        self._renderer.submit(self._render, admission)
        return stream

    async def health(self) -> dict[str, Any]:
        """Counters for /health, read without waiting for the generation thread."""
        sessions = self.store.sessions()
        batch = self._scheduler.stats()
        return {
            "model": self.info.model_id,
            "adapter": self.info.adapter,
            "backend": self.info.backend,
            "context_window": self.info.context_window,
            "write_policy": self.settings.write_policy,
            "sessions": {
                "in_memory": len(sessions),
                "with_kv": sum(1 for s in sessions if s.cache is not None),
                "kv_bytes": sum(s.kv_bytes for s in sessions),
                "max_sessions": self.store.max_sessions,
                "max_kv_bytes": self.store.max_kv_bytes,
                "persisted": self.store.persisted_count(),
                "evictions": self.store.evictions,
                "replay_checks": self.replays.checks,
                "replay_mismatches": self.replays.mismatches,
                **self.store.save_report(),
            },
            "problems": self.store.saves.problems(),
            "prefix_cache": self.prefixes.stats(),
            "disk_cache": self.kv_disk.stats() if self.kv_disk is not None else {"enabled": False},
            "memory": self._memory_report(sessions),
            "jobs": {
                "completed": self.counters.jobs,
                "failed": self.counters.failed,
                "cancelled": self.counters.cancelled,
                "queued": batch["waiting"],
                "prompt_tokens": self.counters.prompt_tokens,
                "cached_tokens": self.counters.cached_tokens,
                "refused_for_memory": self.counters.refused_for_memory,
                "allocation_failures": self.counters.allocation_failures,
            },
            "batch": {**batch, "prefill_chunk": self.settings.prefill_chunk},
            "engine_uptime_s": round(time.time() - self.started, 1),
        }

    async def reset_session(self, session_key: str) -> bool:
        """Forget a session (both modes), in memory and on disk; refused while it is answering."""
        return await self._scheduler.call(lambda: self._reset(hash_session_key(session_key)))

    async def session_stats(self, session_key: str) -> dict[str, Any] | None:
        """Tokens, cache and δ-state figures of a session, or None if it does not exist."""
        return await self._scheduler.call(lambda: self._stats(hash_session_key(session_key)))

    async def save_session(self, session_key: str) -> dict[str, Any]:
        """Write a session to the state dir now (and wait for its disk-cache chunks, off the generation thread)."""
        key_hash = hash_session_key(session_key)
        saved = await self._scheduler.call(lambda: self._save(key_hash))
        if self.kv_disk is not None:
            for delta in (True, False):
                await asyncio.to_thread(self.kv_disk.wait, Session(key_hash, delta).file_stem)
        return saved

    async def load_session(self, session_key: str) -> dict[str, Any]:
        """Bring a session back from the state dir (its KV is rebuilt at its next turn)."""
        return await self._scheduler.call(lambda: self._load(hash_session_key(session_key)))

    async def close(self) -> None:
        """Save every session, let the started and waiting jobs finish, stop the threads (once)."""
        if not self._scheduler.alive:
            return
        await self._scheduler.call(self._save_all)
        await self._scheduler.stop()
        self._renderer.shutdown(wait=False, cancel_futures=True)
        if self.kv_disk is not None:
            await asyncio.to_thread(self.kv_disk.close)

    # ---- rendering (on a render thread) -------------------------------------------------------

    def _render(self, admission: Admission) -> None:
        """Render and tokenize the job's prompt, or refuse it; either way the scheduler may go on."""
        try:
            if not admission.stream.cancelled:  # the client may have left while the job waited here
                admission.prompt = self._prompt(admission.job)
        except PromptRefused as refused:
            admission.stream.emit(refused.failure)
        except Exception:
            self.counters.add(failed=1)
            log.exception("rendering a prompt failed (session %s)", admission.key[:12])
            failure = Failed("the engine failed while reading the prompt; see the server log", "engine_error", 500)
            admission.stream.emit(failure)
        finally:
            self._scheduler.ready(admission)

    def _prompt(self, job: ChatJob) -> list[int]:
        window = self.settings.context_window
        # Text that cannot fit is refused before the (costly) tokenizing.
        floor = self._token_floor([m.content for m in job.messages]) if self._token_floor else 0
        if floor >= window:
            raise PromptRefused(_too_long(f"at least {floor}", window))
        prompt = render_prompt(self.tokenizer, job.messages, job.tools)
        if len(prompt) >= window:
            raise PromptRefused(_too_long(str(len(prompt)), window))
        return prompt

    # ---- the pipeline the scheduler runs (on the generation thread) ---------------------------

    def prefill(self, admission: Admission) -> Steps[Row | None]:
        """The job's prompt, a step at a time; returns the row that decodes its answer, or None."""
        assert admission.prompt is not None  # the scheduler starts rendered jobs only
        try:
            return (yield from self._prefill_job(admission.job, admission.prompt, admission.stream))
        except KvBudgetExceeded as exc:
            self.counters.add(refused_for_memory=1)
            admission.stream.emit(Failed(str(exc), "kv_budget_exceeded", 413))
        except Exception as exc:
            self.counters.add(failed=1)
            if is_allocation_failure(exc):
                self._after_allocation_failure(admission.key, exc)
                admission.stream.emit(OUT_OF_MEMORY)
            else:
                log.exception("chat job failed (session %s)", admission.key[:12])
                admission.stream.emit(ENGINE_FAILED)
        self._write_taken_chunks()  # a shared prefix built before the failure is kept
        return None

    def decode(self, rows: list[Row]) -> list[Row]:
        """One token for every row in one forward pass; finishes off and returns the rows that ended."""
        ended: list[tuple[Row, decoding.FinishReason]] = [(row, "cancelled") for row in rows if row.stream.cancelled]
        live = [row for row in rows if not row.stream.cancelled]
        failed: list[Row] = []
        try:
            if live:
                # Memory guard: room for the token every row adds in this step.
                self._make_room_to_grow((len(row.session.tokens), 1) for row in live)
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
                row.session.cache = None
                self.counters.add(failed=1)
                row.stream.emit(OUT_OF_MEMORY if out_of_memory else ENGINE_FAILED)
            failed = live
        if self._scheduler.steps % CLEAR_CACHE_STEPS == 0:
            mx.clear_cache()
        for row, reason in ended:
            try:
                self._finish(row.session, row.stream, reason, row.generated)
            except Exception:  # a bug in one row's finishing must not stop the generation thread
                log.exception("finishing an answer failed (session %s)", row.session.key_hash[:12])
                self.counters.add(failed=1)
                row.stream.emit(ENGINE_FAILED)
        return [row for row, _ in ended] + failed

    def drop(self, admission: Admission) -> None:
        """End a job cancelled before it started."""
        self.counters.add(cancelled=1)
        admission.stream.emit(Finished("cancelled", 0))

    def room(self, admission: Admission) -> int:
        """Memory guard: the most KV a job will hold (prompt, whole answer, a new shared-prefix snapshot),
        as _prefill_job reserves it; the scheduler starts the job once it fits beside the running ones."""
        assert admission.prompt is not None
        mode = "delta" if admission.job.delta_enabled and delta_info(self.model) is not None else "base"
        return self._needed(*self._request_size(admission.job, admission.prompt, mode))

    def _request_size(self, job: ChatJob, prompt: list[int], mode: str) -> tuple[int, int, int]:
        """The most tokens a request holds (prompt and whole answer), its messages, and the tokens of
        the shared-prefix snapshot it will take (0 when its prefix is in memory already)."""
        boundary = shared_boundary(leading_span(self.tokenizer, prompt), len(prompt))
        snapshot = boundary if boundary and not self.prefixes.contains(mode, prompt[:boundary]) else 0
        tokens = len(prompt) + min(job.max_tokens, self.settings.context_window - len(prompt))
        return tokens, _count_messages(self.tokenizer, prompt), snapshot

    def _prefill_job(self, job: ChatJob, prompt: list[int], stream: JobStream) -> Steps[Row | None]:
        window = self.settings.context_window
        delta = job.delta_enabled and delta_info(self.model) is not None
        session = self.store.get(hash_session_key(job.session_key), delta)
        began = time.perf_counter()
        boundary = shared_boundary(leading_span(self.tokenizer, prompt), len(prompt))
        max_tokens = min(job.max_tokens, window - len(prompt))
        # Memory guard: room for the whole request (and a new shared-prefix snapshot) before any prefill.
        self._reserve(session, *self._request_size(job, prompt, _mode(session)))
        limit = min(common_prefix(session.tokens, prompt), len(prompt) - 1)
        write = None
        if delta:
            # Where the snippets go follows from the prompt and the history, never from what the cache held.
            offset = snippet_offset(message_spans(self.tokenizer, prompt), len(prompt))
            wanted = self._snippet_write(job.snippets, offset) if job.snippets else None
            write = planned_write([w for w in session.snippet_writes if w.offset <= limit], wanted)
            limit = history_limit(session.snippet_writes, limit, offset, write)
        try:
            reused = yield from self._prepare(session, prompt, limit, boundary, stream)
            written = 0
            if write is not None and write not in session.snippet_writes:
                yield from self._prefill_to(session, prompt, write.offset, stream)
                yield from self._apply_snippets(session, write)
                written = write.count
            yield from self._prefill_to(session, prompt, len(prompt) - 1, stream)
        except Cancelled:
            self._finish(session, stream, "cancelled", 0)
            return None
        self.counters.add(prompt_tokens=len(prompt), cached_tokens=reused)
        log.info(
            "session %s (%s): prompt %d tokens, %d reused, %d written in %.2f s, %d memory snippets",
            session.key_hash[:12], _mode(session), len(prompt), reused, len(prompt) - 1 - reused,
            time.perf_counter() - began, written,
        )
        stream.emit(PromptDone(prompt_tokens=len(prompt), cached_tokens=reused, snippets_written=written))
        # Memory guard: the answer's room again, now that the prompt (and any snapshot) is in.
        self._reserve(session, len(session.tokens) + max_tokens, _count_messages(self.tokenizer, prompt))
        if session.delta:
            # Token writes while decoding, as the reference does; the state where the answer starts
            # is kept, so that a retried request rolls back to it without prefilling again.
            set_delta_controls(session.cache, keep=[session.cache[0].offset])
        return Row(
            session=session,
            stream=stream,
            max_tokens=max_tokens,
            sampler=row_sampler(job.temperature, job.top_p, job.seed),
            detokenizer=self.tokenizer.detokenizer,
            scanner=StopScanner(job.stop),
            eos=self._eos,
            input=mx.array([prompt[-1]], dtype=mx.uint32),
        )

    def _prepare(
        self, session: Session, prompt: list[int], limit: int, boundary: int, stream: JobStream
    ) -> Steps[int]:
        """Cut the session back to at most `limit` tokens (-1: nothing kept, not even a memory write
        at offset 0), then bring it up to the shared boundary (the end of the leading system prompt)
        from a zero state; returns tokens reused."""
        if limit < 0:
            session.tokens, session.segments, session.snippet_writes, session.cache = [], [], [], None
            limit = 0
        if session.cache is None:
            reused = yield from self._rebuild(session, session.safe_offset(limit), stream)
        else:
            # Back to a cut the δ record restores exactly: at most 63 tokens before `limit`.
            reused = session.cut_point(limit, lambda offset: restorable_offset(session.cache, offset))
            session.truncate(reused)
        if len(session.tokens) < boundary and not session.snippet_writes:
            reused = max(reused, self._start_from_shared_prefix(session, prompt, boundary))
            yield from self._prefill_to(session, prompt, boundary, stream)
            self.prefixes.insert(_mode(session), prompt[:boundary], session.cache)
            if self.kv_disk is not None:
                self._disk_writes.append(self.kv_disk.take_prefix(_mode(session), prompt[:boundary], session.cache))
        session.reused_tokens += reused
        return reused

    def _start_from_shared_prefix(self, session: Session, prompt: list[int], boundary: int) -> int:
        """Replace the session's cache with the longest shared prefix of prompt[:boundary], if longer."""
        hit = self._fetch_prefix(_mode(session), prompt[:boundary])
        if hit is None or hit[0] <= len(session.tokens):
            return 0
        length, cache = hit
        session.cache = cache
        session.tokens = list(prompt[:length])
        session.segments = self._plan(session.delta, prompt, 0, length)
        return length

    def _rebuild(self, session: Session, target: int, stream: JobStream) -> Steps[int]:
        """Recreate the KV cache of a new, evicted or restored session up to `target`: from the disk
        cache as far as it holds the history, else from a shared prefix, replaying the rest; checked
        against the δ-states it saved. Returns the tokens not replayed."""
        saved = saved_points(session)
        history = Session(
            session.key_hash, session.delta, list(session.tokens), list(session.segments), list(session.snippet_writes)
        )
        history.truncate(target)
        fresh = Session(session.key_hash, session.delta, cache=self._new_cache(session.delta))
        shared = 0
        first_write = history.snippet_writes[0].offset if history.snippet_writes else target
        restored = self._restore_from_disk(history) if target > 0 else None
        if restored is not None:
            shared, fresh.cache, fresh.snippet_writes = restored.length, restored.cache, restored.snippet_writes
        elif first_write > 0:
            hit = self._fetch_prefix(_mode(session), history.tokens[:first_write])
            if hit is not None:
                shared, fresh.cache = hit
        fresh.tokens = history.tokens[:shared]
        fresh.segments = [s if s.end <= shared else s.cut(shared) for s in history.segments if s.start < shared]
        pending = [w for w in history.snippet_writes if w.offset >= shared]
        for step in replay_steps(history.segments, pending, shared):
            if step.snippets is not None:
                yield from self._apply_snippets(fresh, step.snippets)
            else:
                tokens = history.tokens[step.segment.start : step.segment.end]
                yield from self._run_segment(fresh, tokens, step.segment, stream)
        # Only now, with the replay complete, does the session change: a cancelled replay loses nothing.
        if session.delta:
            self.replays.check(self.model, fresh, saved)
        session.tokens, session.segments, session.snippet_writes = fresh.tokens, fresh.segments, fresh.snippet_writes
        session.cache, session.saved_states, session.saved_checkpoints = fresh.cache, None, {}
        session.prefilled_tokens += fresh.prefilled_tokens
        return shared

    def _fetch_prefix(self, mode: str, tokens: list[int]) -> tuple[int, list[Any]] | None:
        """The longest shared prefix of `tokens` in memory, else from disk (kept in memory from then on)."""
        hit = self.prefixes.fetch(mode, tokens)
        if hit is None and self.kv_disk is not None and self.prefixes.max_entries:
            loaded = self.kv_disk.load_prefix(mode, tokens, lambda: self._new_cache(mode == "delta"))
            if loaded is not None:
                self.prefixes.insert(mode, tokens[: loaded[0]], loaded[1])
                hit = self.prefixes.fetch(mode, tokens)
        return hit

    def _restore_from_disk(self, history: Session) -> Restored | None:
        """A session's cache read back from the disk cache; a shared prefix read with it is kept in memory."""
        if self.kv_disk is None:
            return None
        mode = _mode(history)
        restored = self.kv_disk.restore(
            history, lambda: self._new_cache(history.delta), lambda tokens: self.prefixes.peek(mode, tokens)
        )
        if restored is not None and restored.prefix_read is not None and self.prefixes.max_entries:
            prefix = self._new_cache(history.delta)
            fill_cache(prefix, [restored.prefix_read])
            self.prefixes.insert(mode, history.tokens[: restored.prefix_read.end], prefix)
        return restored

    def _remove(self, key_hash: str) -> bool:
        """Forget a session in memory, in its session files and in the disk cache."""
        found = self.store.remove(key_hash)
        if self.kv_disk is not None:
            for delta in (True, False):
                found |= self.kv_disk.remove(Session(key_hash, delta).file_stem)
        return found

    def _snippet_write(self, snippets: tuple[str, ...], offset: int) -> SnippetWrite:
        """A request's memory snippets as one write at `offset`; the digest recognises them when sent again."""
        digest = hashlib.sha256(json.dumps(list(snippets)).encode("utf-8")).hexdigest()
        tokens = tuple(render_text(self.tokenizer, "\n\n".join(snippets)))
        return SnippetWrite(offset, digest, tokens, len(snippets))

    def _apply_snippets(self, session: Session, write: SnippetWrite) -> Steps[None]:
        # One forward pass (one step): message-mean adapters write the snippets as one message.
        write_context(self.model, session.cache, list(write.tokens))
        session.snippet_writes.append(write)
        yield

    def _plan(self, delta: bool, prompt: list[int], start: int, end: int) -> list[Segment]:
        """How to write prompt[start:end] (see write_plan.plan_writes)."""
        policy = dataclasses.replace(self.policy, delta=delta)
        spans = message_spans(self.tokenizer, prompt) if policy.needs_spans and start < end else []
        return plan_writes(policy, spans, start, end)

    def _prefill_to(self, session: Session, prompt: list[int], end: int, stream: JobStream) -> Steps[None]:
        """Write prompt[len(session.tokens):end] into the session, planned as the policy says."""
        start = len(session.tokens)
        yield from self._prefill(session, prompt[start:end], self._plan(session.delta, prompt, start, end), stream)

    def _prefill(self, session: Session, tokens: list[int], plan: list[Segment], stream: JobStream) -> Steps[None]:
        base = len(session.tokens)
        for seg in plan:
            yield from self._run_segment(session, tokens[seg.start - base : seg.end - base], seg, stream)

    def _run_segment(self, session: Session, tokens: list[int], seg: Segment, stream: JobStream) -> Steps[None]:
        """Write tokens into the session's cache the way the segment says, a chunk per step, checking
        for cancellation before each."""
        cache = session.cache
        if seg.kind == "messages":
            steps = [(0, len(tokens))]  # one call: message-mean writes depend on call boundaries
        else:
            chunk = self.guard.prefill_step(seg.end, self.settings.prefill_chunk)
            steps = [(i, min(i + chunk, len(tokens))) for i in range(0, len(tokens), chunk)]
        # The δ record keeps the state before and after every message's `<|im_start|>`: a new request
        # diverges from the session right after one (the next role differs), so rollbacks land there.
        marks = [seg.start + i + j for i in message_starts(self.tokenizer, tokens) for j in (0, 1)]
        for a, b in steps:
            if stream.cancelled:
                raise Cancelled
            # Memory guard: room for what this step adds, beside the caches of the other answers.
            self._make_room_to_grow([(len(session.tokens), b - a)])
            if session.delta:
                ids = [list(seg.message_ids[a:b])] if seg.kind == "messages" else None
                set_delta_controls(cache, write=seg.kind != "read", message_ids=ids, keep=marks)
            self.model(mx.array([tokens[a:b]]), cache=cache)
            mx.eval([c.state for c in cache])
            piece = Segment(seg.start + a, seg.start + b, seg.kind, seg.message_ids[a:b] if seg.message_ids else ())
            session.record(tokens[a:b], piece.kind, piece.message_ids)
            session.prefilled_tokens += b - a
            yield
        mx.clear_cache()

    def _finish(self, session: Session, stream: JobStream, reason: str, completion_tokens: int) -> None:
        session.turns += 1
        self.counters.add(**{"cancelled" if reason == "cancelled" else "jobs": 1})
        self._persist(session)
        if self.kv_disk is not None:
            # Taken before the limits may evict the cache; written once the answer has ended.
            self._disk_writes.append(self.kv_disk.take_session(session))
        self._enforce_limits()
        stream.emit(Finished(reason, completion_tokens))  # type: ignore[arg-type]
        self._write_taken_chunks()

    def _write_taken_chunks(self) -> None:
        """Encode and queue the chunks jobs took for the disk cache, once an answer has ended (or failed)."""
        while self.kv_disk is not None and self._disk_writes:
            self.kv_disk.submit(self._disk_writes.pop(0))

    # ---- memory guard: the one place that keeps the caches within the KV budget ----------

    def _reserve(self, session: Session, tokens: int, messages: int, snapshot_tokens: int = 0) -> None:
        """Make room for `session` to hold `tokens` tokens (plus a prefix snapshot) beside the sessions
        answering now; raise KvBudgetExceeded when it cannot fit even alone."""
        needed = self._needed(tokens, messages, snapshot_tokens)
        if needed > self.guard.budget:
            raise KvBudgetExceeded(needed, self.guard.budget, tokens)
        self._make_room(needed, growing=session)

    def _needed(self, tokens: int, messages: int, snapshot_tokens: int) -> int:
        """Bytes of a session of `tokens` tokens, plus a prefix snapshot of `snapshot_tokens` (0: none)."""
        snapshot = self.guard.session_bytes(snapshot_tokens) if snapshot_tokens else 0
        return self.guard.session_bytes(tokens, messages) + snapshot

    def _make_room_to_grow(self, growth: Iterable[tuple[int, int]]) -> None:
        """Make room for sessions of `length` tokens to take `added` more, for each (length, added).
        Called before every step even when nothing grows: a shared prefix read in since the last
        step (from disk, or a new snapshot) is idle and goes again if it does not fit."""
        size = self.guard.session_bytes
        self._make_room(sum(size(length + added) - size(length) for length, added in growth))

    def _make_room(self, needed: int, growing: Session | None = None) -> None:
        """Evict idle sessions (least recently used first), then shared prefixes, until `needed` bytes
        fit in the budget beside the caches of the sessions answering now (`growing`'s own cache is
        part of `needed`); each answering session counts for the room its job was admitted with, so
        that idle holdings never take what it will grow into. Answering sessions are never evicted:
        when they hold the rest, every idle one goes and the step runs (a failed allocation then
        fails its requests, not the server)."""
        rooms = self._scheduler.busy_rooms()
        busy = frozenset(rooms)
        if growing is not None:
            rooms.pop(growing.key_hash, None)  # its room is `needed`
        sessions = [s for s in self.store.sessions() if s.cache is not None and s is not growing]
        answering = answering_bytes(rooms, [(s.key_hash, s.kv_bytes) for s in sessions if s.key_hash in busy])
        idle = [(("session", s.file_stem), s.kv_bytes) for s in sessions if s.key_hash not in busy]
        idle += [(("prefix", key), nbytes) for key, nbytes in self.prefixes.entries()]
        plan = eviction_plan(answering + needed, self.guard.budget, idle)
        for kind, key in plan if plan is not None else [key for key, _ in idle]:
            if kind == "session":
                self.store.evict(key, "kv budget")
            else:
                self.prefixes.evict(key)

    def _after_allocation_failure(self, key_hash: str, exc: BaseException) -> None:
        """Drop the caches a failed allocation may have left half-written, and MLX's free buffers."""
        self.counters.add(allocation_failures=1)
        log.error("out of memory while answering session %s: %s", key_hash[:12], exc)
        for delta in (True, False):
            session = self.store.peek(key_hash, delta)
            if session is not None:
                session.cache = None  # rebuilt from its history at its next turn
        mx.clear_cache()

    def _memory_report(self, sessions: list[Session]) -> dict[str, Any]:
        with_kv = [s for s in sessions if s.cache is not None]
        return {
            "kv_budget_bytes": self.guard.budget,
            "kv_bits": kv_bits_name(self.settings.kv_bits),
            "kv_group_size": self.settings.kv_group_size,
            "kv_bytes": self.store.kv_bytes + self.prefixes.nbytes,
            "shared_prefix_bytes": self.prefixes.nbytes,
            "delta_record_bytes": sum(delta_record_nbytes(s.cache) for s in with_kv) + self.prefixes.delta_nbytes,
            "sessions": [
                {
                    "session": s.key_hash[:12],
                    "mode": _mode(s),
                    "tokens": len(s.tokens),
                    "kv_bytes": s.kv_bytes,
                    "delta_record_bytes": delta_record_nbytes(s.cache),
                }
                for s in with_kv
            ],
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
        }

    def _enforce_limits(self) -> None:
        """Sessions and shared prefixes together stay within the KV byte bound (sessions go first);
        the sessions answering now keep their caches."""
        self.store.enforce_limits(keep=self._scheduler.busy_keys(), reserved_bytes=self.prefixes.nbytes)
        self.prefixes.trim_to_bytes(max(0, self.store.max_kv_bytes - self.store.kv_bytes))

    def _persist(self, session: Session) -> bool:
        """Save a session after a turn or at shutdown; a failure is logged and counted for /health."""
        try:
            self.store.save(session, *self._states_of(session))
        except StateWriteError as exc:
            log.error("session %s: %s", session.key_hash[:12], exc)
            return False
        return True

    def _states_of(self, session: Session) -> tuple[list[Any] | None, dict[int, list[Any]]]:
        """The session's δ-states after its whole history, and at its checkpoints (for the replay check)."""
        if not session.delta or session.cache is None:
            return session.saved_states, session.saved_checkpoints
        states = delta_states(self.model, session.cache)
        mx.eval(states)
        offsets = checkpoint_offsets(session.tokens, self._message_start)
        return states, checkpoint_states(self.model, session.cache, offsets)

    def _new_cache(self, delta: bool) -> list[Any]:
        cache = make_cache(self.model, self.settings.kv_bits, self.settings.kv_group_size)
        if delta_info(self.model) is not None:
            set_delta_controls(cache, enabled=delta)
        return cache

    # ---- admin (on the generation thread, between two steps) ----------------------------------

    def _reset(self, key_hash: str) -> bool:
        if self._scheduler.busy(key_hash):
            raise EngineError(
                "this session is answering a request; reset it when the answer has ended (or cancel it)",
                409,
                "session_busy",
            )
        try:
            return self._remove(key_hash)
        except StateWriteError as exc:
            raise _state_write_failed(exc) from exc

    def _stats(self, key_hash: str) -> dict[str, Any] | None:
        found = {}
        for delta in (True, False):
            session = self.store.peek(key_hash, delta)
            if session is not None:
                found["delta" if delta else "base"] = describe_session(self.model, session)
        return found or None

    def _save(self, key_hash: str) -> dict[str, Any]:
        if self.store.state_dir is None:
            raise EngineError("this server has no state dir (start it with --state-dir)", 409, "no_state_dir")
        sessions = [s for s in (self.store.peek(key_hash, delta) for delta in (True, False)) if s is not None]
        if not sessions:
            raise EngineError("this session has no state on the server", 404, "session_not_found")
        for session in sessions:
            try:
                self.store.save(session, *self._states_of(session))
            except StateWriteError as exc:  # a save that wrote nothing must not answer 200
                raise _state_write_failed(exc) from exc
        return {"saved": [_mode(session) for session in sessions]}

    def _load(self, key_hash: str) -> dict[str, Any]:
        loaded = {}
        for delta in (True, False):
            session = self.store.peek(key_hash, delta)
            if session is not None:
                self.store.get(key_hash, delta)
                loaded["delta" if delta else "base"] = {"tokens": len(session.tokens), "kv_in_memory": session.cache is not None}
        if not loaded:
            raise EngineError("no saved state for this session", 404, "session_not_found")
        return {"loaded": loaded}

    def _save_all(self) -> None:
        sessions = self.store.sessions() + self.store.evicted_unsaved()
        failed = sum(not self._persist(session) for session in sessions)
        if failed:
            log.error("%d session(s) could not be saved at shutdown: their turns since the last save are lost", failed)


def _too_long(tokens: str, window: int) -> Failed:
    return Failed(
        f"the prompt is {tokens} tokens; this model's context window is {window}", "context_length_exceeded", 400
    )


def _state_write_failed(exc: StateWriteError) -> EngineError:
    return EngineError(str(exc), 500, "state_write_failed")


def _mode(session: Session) -> str:
    return "delta" if session.delta else "base"


def _count_messages(tokenizer: Any, prompt: list[int]) -> int:
    return len(message_starts(tokenizer, prompt)) * 2  # two kept δ-states per message (see _run_segment)


def _kv_guard(model: Any, settings: SidecarSettings) -> KvGuard:
    """The arithmetic for this model's caches, and the budget in force (MLX's memory limit may lower it)."""
    shape = KvShape.from_dirs(settings.model_path, settings.adapter_path)
    budget = effective_budget(settings.max_kv_bytes, mx.get_memory_limit(), mx.get_active_memory())
    if budget < settings.max_kv_bytes:
        log.warning("KV budget %d bytes: MLX's memory limit leaves less than --max-kv-bytes", budget)
    return KvGuard(shape, model.args.num_attention_heads, budget, settings.kv_bits, settings.kv_group_size)


def _kv_disk(model: Any, settings: SidecarSettings, fingerprint: SessionFingerprint | None) -> KvDisk | None:
    """The disk cache under the state dir, keyed by what the cached arrays depend on; None when off."""
    if fingerprint is None or settings.state_dir is None or settings.max_disk_bytes == 0:
        return None
    # The K/V dtype is what the layers compute in: the embedding's output (its scales' when quantized).
    dtype = model.model.embed_tokens(mx.array([[0]])).dtype
    kv_format = f"{dtype}|kv {kv_bits_name(settings.kv_bits)}/{settings.kv_group_size}"
    root = Path(settings.state_dir) / "kv"
    return KvDisk(root, settings.max_disk_bytes, lambda: f"{fingerprint.current}|{kv_format}")


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
