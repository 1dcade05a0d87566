"""Prompts rendered and tokenized on a pool of render threads, never on the generation thread.

A huge prompt being tokenized (seconds for megabytes) holds up no other session; text that cannot
fit the context window is refused before the (costly) tokenizing.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sidecar.engine.failures import JobCounters, PromptRefused, failures_told
from sidecar.engine.interface import ChatJob, Failed
from sidecar.engine.prompt_layout import PromptLayout, analyse_prompt
from sidecar.engine.prompts import TokenFloor, render_prompt
from sidecar.engine.scheduler import Admission

RENDER_THREADS = 4
READING_FAILED = Failed("the engine failed while reading the prompt; see the server log", "engine_error", 500)


class Renderer:
    """Renders each admitted job's prompt on a render thread, then tells the scheduler it may start."""

    def __init__(
        self, tokenizer: Any, context_window: int, counters: JobCounters, ready: Callable[[Admission], None]
    ) -> None:
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.counters = counters
        self._ready = ready
        self._token_floor = TokenFloor.of(tokenizer)
        self._pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="delta-mem-render")

    def submit(self, admission: Admission) -> None:
        """Render the job's prompt on a render thread."""
        self._pool.submit(self.render, admission)

    def close(self) -> None:
        """Stop the render threads; prompts not rendered yet are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def render(self, admission: Admission) -> None:
        """Render and tokenize the job's prompt, or refuse it; either way the scheduler may go on."""
        stream = admission.stream
        try:
            with failures_told(stream, admission.key, self.counters, "rendering a prompt failed", READING_FAILED):
                if not admission.stream.cancelled:  # the client may have left while the job waited here
                    admission.layout = self.layout(admission.job)
        finally:
            self._ready(admission)

    def layout(self, job: ChatJob) -> PromptLayout:
        """The job's prompt tokens and where its messages sit; PromptRefused when it cannot fit the context window."""
        window = self.context_window
        # Text that cannot fit is refused before the (costly) tokenizing.
        floor = self._token_floor([m.content for m in job.messages]) if self._token_floor else 0
        if floor >= window:
            raise PromptRefused(_too_long(f"at least {floor}", window))
        prompt = render_prompt(self.tokenizer, job.messages, job.tools)
        if len(prompt) >= window:
            raise PromptRefused(_too_long(str(len(prompt)), window))
        return analyse_prompt(self.tokenizer, prompt)


def _too_long(tokens: str, window: int) -> Failed:
    return Failed(
        f"the prompt is {tokens} tokens; this model's context window is {window}", "context_length_exceeded", 400
    )
