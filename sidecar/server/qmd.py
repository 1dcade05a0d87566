"""QMD fallback: ask the `qmd` CLI for memory snippets when a request carries none.

Used when the server runs with `--attention-state-source qmd`: the latest user text is the query,
and what QMD finds is written into the session's δ-state as hidden memory, as request snippets are.

Every failure (missing binary, timeout, non-zero exit, oversized or non-JSON output) yields no
snippets and a reason for the log; a request never fails because of QMD.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from dataclasses import dataclass
from typing import Any, cast

from common.settings import QmdSettings
from sidecar.server.memory_input import MemorySnippet, memory_snippets

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 1024 * 1024
MAX_QUERY_CHARS = 2_000
_READ_CHUNK = 64 * 1024
_STDERR_TAIL_BYTES = 2_000
_REAP_TIMEOUT_S = 5.0

# QMD prefixes each snippet with a diff-style hunk header, e.g. "@@ -2,3 @@ (1 before, 0 after)".
_HUNK_HEADER = re.compile(r"\A\s*@@[^\n]*?@@[^\n]*(?:\n|\Z)")


@dataclass(frozen=True)
class QmdResult:
    """What a QMD lookup found; `reason` says why it found nothing when it failed."""

    snippets: list[MemorySnippet]
    reason: str | None = None


def qmd_argv(settings: QmdSettings, query: str) -> list[str]:
    """The argument list for one lookup; the query goes after `--` so a leading '-' stays text."""
    argv = [settings.bin, settings.mode, "--json", "-n", str(settings.limit)]
    if settings.collection:
        argv += ["-c", settings.collection]
    if settings.index:
        argv += ["--index", settings.index]
    if settings.min_score is not None:
        argv += ["--min-score", str(settings.min_score)]
    return [*argv, "--", query]


def qmd_query(text: str) -> str:
    """A one-line, bounded query: newlines would turn a `qmd query` into a typed query document."""
    return " ".join(text.split())[:MAX_QUERY_CHARS]


def strip_hunk_header(snippet: str) -> str:
    """Drop QMD's leading `@@ … @@` line from a snippet."""
    return _HUNK_HEADER.sub("", snippet, count=1).strip()


async def qmd_lookup(settings: QmdSettings, text: str, max_output_bytes: int = MAX_OUTPUT_BYTES) -> QmdResult:
    """Run QMD for `text` (never through a shell) and return its snippets, or none and why."""
    query = qmd_query(text)
    if not query:
        return QmdResult([], "no user text to search for")
    argv = qmd_argv(settings, query)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a timeout can kill qmd and anything it started
        )
    except FileNotFoundError:
        return QmdResult([], f"qmd binary not found: {settings.bin}")
    except OSError as exc:
        return QmdResult([], f"qmd could not start: {exc}")
    try:
        stdout, stderr = await asyncio.wait_for(_collect(proc, max_output_bytes), settings.timeout)
    except TimeoutError:
        return QmdResult([], f"qmd timed out after {settings.timeout:g} s")
    except _OutputTooLarge:
        return QmdResult([], f"qmd printed more than {max_output_bytes} bytes")
    finally:
        await _reap(proc)
    if proc.returncode != 0:
        tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL_BYTES:]
        return QmdResult([], f"qmd exited with status {proc.returncode}: {tail or 'no message'}")
    return _parse_output(stdout)


def _parse_output(stdout: bytes) -> QmdResult:
    try:
        data = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return QmdResult([], "qmd output is not JSON")
    if not isinstance(data, list):
        return QmdResult([], "qmd output is not a JSON array")
    problems: list[str] = []
    snippets = memory_snippets([_as_memory_entry(entry) for entry in data], problems)
    return QmdResult(snippets, "; ".join(problems) or None)


def _as_memory_entry(entry: Any) -> Any:
    # A QMD hit is {docid, score, file, line, title, context?, snippet}; anything else is left
    # for memory_snippets to skip and count.
    if not isinstance(entry, dict) or not isinstance(entry.get("snippet"), str):
        return entry
    return {"snippet": strip_hunk_header(entry["snippet"]), "source": entry.get("file"), "score": entry.get("score")}


class _OutputTooLarge(Exception):
    pass


async def _collect(proc: asyncio.subprocess.Process, limit: int) -> tuple[bytes, bytes]:
    # Both pipes were requested in create_subprocess_exec, so neither is None.
    out_pipe = cast(asyncio.StreamReader, proc.stdout)
    stderr_task = asyncio.ensure_future(_read_tail(cast(asyncio.StreamReader, proc.stderr)))
    try:
        stdout = bytearray()
        while chunk := await out_pipe.read(_READ_CHUNK):
            stdout += chunk
            if len(stdout) > limit:
                raise _OutputTooLarge
        await proc.wait()
        return bytes(stdout), await stderr_task
    finally:
        stderr_task.cancel()


async def _read_tail(stream: asyncio.StreamReader) -> bytes:
    # QMD writes progress to stderr; only the end is worth logging, and it must not fill a pipe.
    tail = b""
    while chunk := await stream.read(_READ_CHUNK):
        tail = (tail + chunk)[-_STDERR_TAIL_BYTES:]
    return tail


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # asyncio's wait() returns only once both pipes are closed, and a pipe left unread (output cut
    # at the size cap) never closes: drain them. Bounded, in case something outside qmd's process
    # group still holds a pipe open.
    try:
        await asyncio.wait_for(_drain_and_wait(proc), _REAP_TIMEOUT_S)
    except TimeoutError:
        log.warning("qmd (pid %d) was killed but its output pipes stayed open; not waiting for them", proc.pid)


async def _drain_and_wait(proc: asyncio.subprocess.Process) -> None:
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            while await stream.read(_READ_CHUNK):
                pass
    await proc.wait()
