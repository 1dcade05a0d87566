"""The prefill pipeline: a job's prompt into its session's cache, a step (one forward pass) at a time.

The session is cut back to the longest common prefix with the prompt (back to where the δ record
restores it: at most 63 tokens before, see sidecar/delta/cache.py), or rebuilt from its history
when it has no cache, and only the rest of the prompt is prefilled, a chunk per step. Hidden-memory
snippets are written into the δ-state just before the request's last user message: a place that
follows from the request and the session's history, never from what the cache happened to hold.
The result is the row that decodes the answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import mlx.core as mx

from common.settings import SidecarSettings
from sidecar.delta.api import delta_info, restorable_offset, set_delta_controls, write_context
from sidecar.engine.cache_tiers import CacheTiers
from sidecar.engine.decoding import Row
from sidecar.engine.failures import JobCounters
from sidecar.engine.interface import ChatJob, FinishReason, PromptDone
from sidecar.engine.memory_guard import KvGuard
from sidecar.engine.memory_keeper import MemoryKeeper
from sidecar.engine.prompt_layout import PromptLayout
from sidecar.engine.prompts import render_text
from sidecar.engine.sampling import row_sampler
from sidecar.engine.scheduler import Cancelled, JobChannel
from sidecar.engine.stop_strings import StopScanner
from sidecar.engine.write_plan import (
    WritePolicy,
    history_limit,
    plan_writes,
    planned_write,
    replay_steps,
    snippet_offset,
)
from sidecar.sessions.replay_check import ReplayChecks, saved_points
from sidecar.sessions.state import Segment, Session, SnippetWrite, common_prefix
from sidecar.sessions.store import SessionStore

log = logging.getLogger(__name__)

T = TypeVar("T")
# The pipeline runs as generators: each `yield` ends one step (one forward pass), so the scheduler
# can run a decode step for the batch before the next one.
Steps = Generator[None, None, T]

Finish = Callable[[Session, JobChannel, FinishReason, int], None]


class Prefill:
    """Brings a session's cache up to a job's prompt, reusing what it holds, and hands back the decode row."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: SidecarSettings,
        policy: WritePolicy,
        *,
        store: SessionStore,
        guard: KvGuard,
        memory: MemoryKeeper,
        tiers: CacheTiers,
        replays: ReplayChecks,
        counters: JobCounters,
        finish: Finish,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.policy = policy
        self.store = store
        self.guard = guard
        self.memory = memory
        self.tiers = tiers
        self.replays = replays
        self.counters = counters
        self._finish = finish  # ends a job cancelled while prefilling
        self._eos = frozenset(tokenizer.eos_token_ids)

    def prefill_job(self, job: ChatJob, layout: PromptLayout, stream: JobChannel) -> Steps[Row | None]:
        """The job's prompt, a step at a time; returns the row that decodes its answer, or None if cancelled."""
        prompt = layout.tokens
        window = self.settings.context_window
        delta = job.delta_enabled and delta_info(self.model) is not None
        session = self.store.get(job.key_hash, delta)
        began = time.perf_counter()
        max_tokens = min(job.max_tokens, window - len(prompt))
        # Memory guard: room for the whole request (and a new shared-prefix snapshot) before any prefill.
        self.memory.reserve(session, *self.request_size(job, layout, session.mode))
        limit = min(common_prefix(session.tokens, prompt), len(prompt) - 1)
        write = None
        if delta:
            # Where the snippets go follows from the prompt and the history, never from what the cache held.
            offset = snippet_offset(layout.spans, len(prompt))
            wanted = self._snippet_write(job.snippets, offset) if job.snippets else None
            write = planned_write([w for w in session.snippet_writes if w.offset <= limit], wanted)
            limit = history_limit(session.snippet_writes, limit, offset, write)
        try:
            reused = yield from self._prepare(session, layout, limit, stream)
            written = 0
            if write is not None and write not in session.snippet_writes:
                yield from self._prefill_to(session, layout, write.offset, stream)
                yield from self._apply_snippets(session, write)
                written = write.count
            yield from self._prefill_to(session, layout, len(prompt) - 1, stream)
        except Cancelled:
            self._finish(session, stream, "cancelled", 0)
            return None
        self.counters.add(prompt_tokens=len(prompt), cached_tokens=reused)
        log.info(
            "session %s (%s): prompt %d tokens, %d reused, %d written in %.2f s, %d memory snippets",
            session.key_hash[:12], session.mode, len(prompt), reused, len(prompt) - 1 - reused,
            time.perf_counter() - began, written,
        )
        stream.emit(PromptDone(prompt_tokens=len(prompt), cached_tokens=reused, snippets_written=written))
        # Memory guard: the answer's room again, now that the prompt (and any snapshot) is in.
        self.memory.reserve(session, len(session.tokens) + max_tokens, layout.kept_states)
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

    def request_size(self, job: ChatJob, layout: PromptLayout, mode: str) -> tuple[int, int, int]:
        """The most tokens a request holds (prompt and whole answer), its kept δ-states, and the tokens
        of the shared-prefix snapshot it will take (0 when its prefix is in memory already)."""
        prompt, boundary = layout.tokens, layout.boundary
        snapshot = boundary if boundary and not self.tiers.prefixes.contains(mode, prompt[:boundary]) else 0
        tokens = len(prompt) + min(job.max_tokens, self.settings.context_window - len(prompt))
        return tokens, layout.kept_states, snapshot

    def _prepare(self, session: Session, layout: PromptLayout, limit: int, stream: JobChannel) -> Steps[int]:
        """Cut the session back to at most `limit` tokens (-1: nothing kept, not even a memory write at
        offset 0), then bring it up to the shared boundary (the end of the leading system prompt) from
        a zero state; returns tokens reused."""
        prompt, boundary = layout.tokens, layout.boundary
        if limit < 0:
            session.tokens, session.segments, session.snippet_writes, session.cache = [], [], [], None
            limit = 0
        if session.cache is None:
            reused = yield from self._rebuild(session, session.safe_offset(limit), layout, stream)
        else:
            # Back to a cut the δ record restores exactly: at most 63 tokens before `limit`.
            reused = session.cut_point(limit, lambda offset: restorable_offset(session.cache, offset))
            session.truncate(reused)
        if len(session.tokens) < boundary and not session.snippet_writes:
            reused = max(reused, (yield from self._start_from_shared_prefix(session, layout)))
            yield from self._prefill_to(session, layout, boundary, stream)
            session.cache = self.tiers.keep_prefix(session.mode, prompt[:boundary], session.cache)
        session.reused_tokens += reused
        return reused

    def _start_from_shared_prefix(self, session: Session, layout: PromptLayout) -> Steps[int]:
        """Replace the session's cache with the longest shared prefix of prompt[:boundary], if longer."""
        prompt, boundary = layout.tokens, layout.boundary
        hit = yield from self.tiers.fetch_prefix(session.mode, prompt[:boundary])
        if hit is None or hit[0] <= len(session.tokens):
            return 0
        length, cache = hit
        session.cache = cache
        session.tokens = list(prompt[:length])
        session.segments = self._plan(session.delta, layout, 0, length)
        return length

    def _rebuild(self, session: Session, target: int, layout: PromptLayout, stream: JobChannel) -> Steps[int]:
        """Recreate the KV cache of a new, evicted or restored session up to `target`: from the disk
        cache as far as it holds the history, else from a shared prefix, replaying the rest; checked
        against the δ-states it saved. Returns the tokens not replayed. The history up to `target` is
        the prompt's too, so the prompt's layout says where its messages start."""
        saved = saved_points(session)
        history = Session(
            session.key_hash, session.delta, list(session.tokens), list(session.segments), list(session.snippet_writes)
        )
        history.truncate(target)
        fresh = Session(session.key_hash, session.delta, cache=self.tiers.new_cache(session.delta))
        shared = 0
        first_write = history.snippet_writes[0].offset if history.snippet_writes else target
        restored = (yield from self.tiers.restore_from_disk(history)) if target > 0 else None
        if restored is not None:
            shared, fresh.cache, fresh.snippet_writes = restored.length, restored.cache, restored.snippet_writes
        elif first_write > 0:
            hit = yield from self.tiers.fetch_prefix(session.mode, history.tokens[:first_write])
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
                yield from self._run_segment(fresh, tokens, step.segment, stream, layout.starts)
        # Only now, with the replay complete, does the session change: a cancelled replay loses nothing.
        if session.delta:
            self.replays.check(self.model, fresh, saved)
        session.adopt(fresh)
        return shared

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

    def _plan(self, delta: bool, layout: PromptLayout, start: int, end: int) -> list[Segment]:
        """How to write prompt[start:end] (see write_plan.plan_writes)."""
        policy = dataclasses.replace(self.policy, delta=delta)
        spans = layout.spans if policy.needs_spans and start < end else ()
        return plan_writes(policy, spans, start, end)

    def _prefill_to(self, session: Session, layout: PromptLayout, end: int, stream: JobChannel) -> Steps[None]:
        """Write prompt[len(session.tokens):end] into the session, planned as the policy says."""
        plan = self._plan(session.delta, layout, len(session.tokens), end)
        yield from self._prefill(session, layout, plan, stream)

    def _prefill(self, session: Session, layout: PromptLayout, plan: list[Segment], stream: JobChannel) -> Steps[None]:
        for seg in plan:
            yield from self._run_segment(session, layout.tokens[seg.start : seg.end], seg, stream, layout.starts)

    def _run_segment(
        self, session: Session, tokens: list[int], seg: Segment, stream: JobChannel, starts: Sequence[int]
    ) -> Steps[None]:
        """Write tokens into the session's cache the way the segment says, a chunk per step, checking
        for cancellation before each; `starts`: where messages start in the prompt the tokens are from."""
        cache = session.cache
        if seg.kind == "messages":
            steps = [(0, len(tokens))]  # one call: message-mean writes depend on call boundaries
        else:
            # Quantized caches too: their prefill attends in float (sidecar.delta.attention.attention).
            chunk = self.settings.prefill_chunk
            steps = [(i, min(i + chunk, len(tokens))) for i in range(0, len(tokens), chunk)]
        # The δ record keeps the state before and after every message's `<|im_start|>`: a new request
        # diverges from the session right after one (the next role differs), so rollbacks land there.
        marks = [i + j for i in starts if seg.start <= i < seg.end for j in (0, 1)]
        for a, b in steps:
            if stream.cancelled:
                raise Cancelled
            # Memory guard: room for what this step adds, beside the caches of the other answers.
            self.memory.make_room_to_grow([(len(session.tokens), b - a)])
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
