"""Session admin on the generation thread, between two steps: reset, stats, save, load, and persisting.

Every session is saved after each of its turns and at shutdown; a failed save is logged and counted
(for /health), never an error for the answer that triggered it. An admin call that cannot do what
it was asked raises an EngineError the client is shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from sidecar.delta.api import delta_states
from sidecar.engine.cache_tiers import CacheTiers
from sidecar.engine.interface import EngineError
from sidecar.sessions.replay_check import checkpoint_offsets, checkpoint_states
from sidecar.sessions.report import describe_session
from sidecar.sessions.state import Session
from sidecar.sessions.store import SessionStore, StateWriteError

log = logging.getLogger(__name__)


class SessionAdmin:
    """Resets, describes, saves and loads sessions; saves each after its turn."""

    def __init__(
        self,
        model: Any,
        store: SessionStore,
        tiers: CacheTiers,
        message_start: int | None,
        answering: Callable[[], frozenset[str]],
    ) -> None:
        self.model = model
        self.store = store
        self.tiers = tiers
        self._message_start = message_start
        self._answering = answering  # the key hashes of the sessions answering now

    def reset(self, key_hash: str) -> bool:
        """Forget a session (both modes), in memory and on disk; refused while it is answering."""
        if key_hash in self._answering():
            raise EngineError(
                "this session is answering a request; reset it when the answer has ended (or cancel it)",
                409,
                "session_busy",
            )
        try:
            return self._remove(key_hash)
        except StateWriteError as exc:
            raise _state_write_failed(exc) from exc

    def stats(self, key_hash: str) -> dict[str, Any] | None:
        """Tokens, cache and δ-state figures of a session, or None if it does not exist."""
        found = {session.mode: describe_session(self.model, session) for session in self.store.peek_modes(key_hash)}
        return found or None

    def save(self, key_hash: str) -> dict[str, Any]:
        """Write a session to the state dir now."""
        if self.store.state_dir is None:
            raise EngineError("this server has no state dir (start it with --state-dir)", 409, "no_state_dir")
        sessions = self.store.peek_modes(key_hash)
        if not sessions:
            raise EngineError("this session has no state on the server", 404, "session_not_found")
        for session in sessions:
            try:
                self.store.save(session, *self._states_of(session))
            except StateWriteError as exc:  # a save that wrote nothing must not answer 200
                raise _state_write_failed(exc) from exc
        return {"saved": [session.mode for session in sessions]}

    def load(self, key_hash: str) -> dict[str, Any]:
        """Bring a session back from the state dir (its KV is rebuilt at its next turn)."""
        loaded = {}
        for session in self.store.peek_modes(key_hash):
            self.store.get(key_hash, session.delta)
            loaded[session.mode] = {"tokens": len(session.tokens), "kv_in_memory": session.cache is not None}
        if not loaded:
            raise EngineError("no saved state for this session", 404, "session_not_found")
        return {"loaded": loaded}

    def save_all(self) -> None:
        """Save every session (at shutdown); failures are logged."""
        sessions = self.store.sessions() + self.store.evicted_unsaved()
        failed = sum(not self.persist(session) for session in sessions)
        if failed:
            log.error("%d session(s) could not be saved at shutdown: their turns since the last save are lost", failed)

    def persist(self, session: Session) -> bool:
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

    def _remove(self, key_hash: str) -> bool:
        """Forget a session in memory, in its session files and in the disk cache."""
        found = self.store.remove(key_hash)
        found |= self.tiers.remove_files(key_hash)
        return found


def _state_write_failed(exc: StateWriteError) -> EngineError:
    return EngineError(str(exc), 500, "state_write_failed")
