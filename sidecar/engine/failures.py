"""What a job that cannot run tells its client, the one way it is told, and the engine's job counters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from common.counters import Counters
from sidecar.engine.interface import Failed
from sidecar.engine.memory_guard import KvBudgetExceeded, is_allocation_failure
from sidecar.engine.scheduler import JobChannel

log = logging.getLogger(__name__)

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


@contextmanager
def failures_told(
    stream: JobChannel,
    key_hash: str,
    counters: JobCounters,
    what_failed: str,
    failure: Failed = ENGINE_FAILED,
    out_of_memory: Callable[[BaseException], None] | None = None,
) -> Iterator[None]:
    """Run a job's work; whatever it raises ends the job (the generation thread goes on). A refusal
    is told as is; a failure is counted, logged as `what_failed` and told as `failure`, or, for a
    failed allocation when `out_of_memory` is given, handed to it and told as OUT_OF_MEMORY."""
    try:
        yield
    except PromptRefused as refused:
        stream.emit(refused.failure)
    except KvBudgetExceeded as exc:
        counters.add(refused_for_memory=1)
        stream.emit(Failed(str(exc), "kv_budget_exceeded", 413))
    except Exception as exc:
        counters.add(failed=1)
        if out_of_memory is not None and is_allocation_failure(exc):
            out_of_memory(exc)
            stream.emit(OUT_OF_MEMORY)
        else:
            log.exception("%s (session %s)", what_failed, key_hash[:12])
            stream.emit(failure)
