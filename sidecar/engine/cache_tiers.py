"""The caches below a session's own: shared prefixes in memory, and the disk cache under them.

A rebuild asks here first: the disk cache as far as it holds the history, else the longest shared
prefix (in memory, else read from disk and kept in memory from then on). Chunks for the disk cache
are taken while a job runs and written once its answer has ended (or failed).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx

from common.kv_budget import kv_bits_name
from common.settings import SidecarSettings
from sidecar.delta.api import delta_info, make_cache, set_delta_controls
from sidecar.delta.cache_chunks import CacheChunk, cache_layout, fill_cache
from sidecar.kvcache.disk_cache import KvDisk, Restored, until_read
from sidecar.kvcache.disk_writer import PendingChunk
from sidecar.kvcache.prefix_cache import PrefixCache
from sidecar.sessions.fingerprint import SessionFingerprint
from sidecar.sessions.state import MODES, Session, file_stem

T = TypeVar("T")
# A read from disk waits on the reader thread, a `yield` at a time: the scheduler runs the other
# rows' steps meanwhile (see sidecar/engine/prefill.py).
Steps = Generator[None, None, T]


class CacheTiers:
    """Shared prefixes in memory and the disk cache (None when off), and the chunks waiting for it."""

    def __init__(self, model: Any, settings: SidecarSettings, prefixes: PrefixCache, kv_disk: KvDisk | None) -> None:
        self.model = model
        self.settings = settings
        self.prefixes = prefixes
        self.kv_disk = kv_disk
        self._disk_writes: list[PendingChunk | None] = []  # taken during a job, written once it has answered

    def new_cache(self, delta: bool) -> list[Any]:
        """An empty cache for this model, δ on or off."""
        cache = make_cache(self.model, self.settings.kv_bits, self.settings.kv_group_size)
        if delta_info(self.model) is not None:
            set_delta_controls(cache, enabled=delta)
        return cache

    def fetch_prefix(self, mode: str, tokens: list[int]) -> Steps[tuple[int, list[Any]] | None]:
        """The longest shared prefix of `tokens` in memory, else from disk (kept in memory from then on;
        the other rows take their steps while it is read)."""
        hit = self.prefixes.fetch(mode, tokens)
        if hit is None and self.kv_disk is not None and self.prefixes.max_entries:
            read = self.kv_disk.read_prefix(mode, tokens)
            yield from until_read(read)
            loaded = self.kv_disk.load_prefix(read, lambda: self.new_cache(mode == "delta")) if read else None
            if loaded is not None:
                self.prefixes.insert(mode, tokens[: loaded[0]], loaded[1], copy_cache=False)
                hit = self.prefixes.fetch(mode, tokens)
        return hit

    def restore_from_disk(self, history: Session) -> Steps[Restored | None]:
        """A session's cache read back from the disk cache (the other rows take their steps while it is
        read); a shared prefix read with it is kept in memory."""
        if self.kv_disk is None:
            return None
        mode = history.mode
        read = self.kv_disk.read_session(history, lambda tokens: self.prefixes.peek(mode, tokens))
        yield from until_read(read)
        return self.kv_disk.restore(read, lambda prefix: self._restore_into(history, prefix))

    def _restore_into(self, history: Session, prefix: CacheChunk | None) -> list[Any]:
        """The empty cache a restore fills: one that references the shared prefix the files start with
        (kept in memory from now on, if it was read from disk), else a private one."""
        if prefix is None or not self.prefixes.max_entries:
            return self.new_cache(history.delta)
        tokens = history.tokens[: prefix.end]
        if not self.prefixes.contains(history.mode, tokens):
            snapshot = self.new_cache(history.delta)
            fill_cache(snapshot, [prefix])
            self.prefixes.insert(history.mode, tokens, snapshot, copy_cache=False)
        return self.prefixes.start_from(history.mode, tokens) or self.new_cache(history.delta)

    def keep_prefix(self, mode: str, tokens: list[int], cache: list[Any]) -> list[Any]:
        """Keep a shared prefix in memory, and take its chunks for the disk cache; returns the cache the
        session goes on with. When sharing, `cache` itself is kept (no copy) and the session goes on
        with a cache that references it; otherwise a copy is kept and the session keeps `cache`."""
        self.prefixes.insert(mode, tokens, cache, copy_cache=not self.prefixes.share)
        if self.kv_disk is not None:
            self._disk_writes.append(self.kv_disk.take_prefix(mode, tokens, cache))
        return self.prefixes.start_from(mode, tokens) or cache

    def take_session(self, session: Session) -> None:
        """Take a session's new chunks for the disk cache (before the limits may evict its cache)."""
        if self.kv_disk is not None:
            self._disk_writes.append(self.kv_disk.take_session(session))

    def write_taken_chunks(self) -> None:
        """Encode and queue the chunks jobs took for the disk cache, once an answer has ended (or failed)."""
        while self.kv_disk is not None and self._disk_writes:
            self.kv_disk.queue_write(self._disk_writes.pop(0))

    def remove_files(self, key_hash: str) -> bool:
        """Forget a key's chunks (both modes) in the disk cache; True if there were any."""
        found = False
        if self.kv_disk is not None:
            for delta in MODES:
                found |= self.kv_disk.remove(file_stem(key_hash, delta))
        return found

    def wait_for_writes(self, key_hash: str) -> None:
        """Block until a key's chunks (both modes) are on disk (called off the generation thread)."""
        if self.kv_disk is not None:
            for delta in MODES:
                self.kv_disk.wait(file_stem(key_hash, delta))

    def disk_stats(self) -> dict[str, Any]:
        """The disk cache's figures for /health."""
        return self.kv_disk.stats() if self.kv_disk is not None else {"enabled": False}

    def disk_problems(self) -> list[str]:
        """What /health lists about the disk cache (failing writes, stalled reads)."""
        return self.kv_disk.problems() if self.kv_disk is not None else []

    def close(self) -> None:
        """Let the disk cache finish its writes (called off the generation thread)."""
        if self.kv_disk is not None:
            self.kv_disk.close()


def open_kv_disk(model: Any, settings: SidecarSettings, fingerprint: SessionFingerprint | None) -> KvDisk | None:
    """The disk cache under the state dir, keyed by what the cached arrays depend on; None when off."""
    if fingerprint is None or settings.state_dir is None or settings.max_disk_bytes == 0:
        return None
    # The K/V dtype is what the layers compute in: the embedding's output (its scales' when quantized).
    dtype = model.model.embed_tokens(mx.array([[0]])).dtype
    kv_format = f"{dtype}|kv {kv_bits_name(settings.kv_bits)}/{settings.kv_group_size}"
    root = Path(settings.state_dir) / "kv"
    layout = cache_layout(model, make_cache(model, settings.kv_bits, settings.kv_group_size))
    return KvDisk(root, settings.max_disk_bytes, lambda: f"{fingerprint.current}|{kv_format}", layout)
