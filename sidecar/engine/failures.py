"""What a job that cannot run tells its client, and the engine's job counters."""

from __future__ import annotations

from dataclasses import dataclass

from common.counters import Counters
from sidecar.engine.interface import Failed

ENGINE_FAILED = Failed("the engine failed while answering; see the server log", "engine_error", 500)
OUT_OF_MEMORY = Failed("the server ran out of memory for this request; it is healthy, retry", "out_of_memory", 503)


class PromptRefused(Exception):
    """A prompt that cannot run, with the failure to send its client."""

    def __init__(self, failure: Failed) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class JobCounters(Counters):
    """Jobs and tokens for /health; render threads count failures too, so every change goes through add()."""

    jobs: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    refused_for_memory: int = 0
    allocation_failures: int = 0
