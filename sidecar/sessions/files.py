"""Session files: one `.npz` per session and mode, named by the key's hash, written atomically.

The file holds only arrays (read back with allow_pickle=False): the token ids, a JSON header as
bytes, the ids of message-mean writes, the hidden-memory tokens, the δ-state per layer after the
whole history (`state_{i}`) and at earlier checkpoints (`checkpoint_offsets`, and `checkpoint_{i}`
stacked in that order). Files written before checkpoints existed have none and still load.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from common.files import atomic_write_bytes
from sidecar.sessions.state import Segment, Session, SnippetWrite

log = logging.getLogger("sidecar.sessions.store")

FORMAT = 1
_KINDS = ("write", "read", "messages", "plain")


class SessionFileError(ValueError):
    """A session file that cannot be used (corrupt, truncated, or made by another model)."""


def save_session_file(
    path: Path, session: Session, fingerprint: str, states: list[Any] | None, checkpoints: dict[int, list[Any]]
) -> None:
    """Write a session's history, its δ-states and its checkpoints' δ-states to `path` atomically (owner-only)."""
    header = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "key_hash": session.key_hash,
        "delta": session.delta,
        "created": session.created,
        "last_used": session.last_used,
        "turns": session.turns,
        "prefilled_tokens": session.prefilled_tokens,
        "reused_tokens": session.reused_tokens,
        "segments": [[s.start, s.end, s.kind] for s in session.segments],
        # "contexts" and "context_tokens": the snippet writes, under the names of format 1.
        "contexts": [
            {"offset": c.offset, "digest": c.digest, "length": len(c.tokens), "count": c.count}
            for c in session.snippet_writes
        ],
        "layers": 0 if states is None else len(states),
    }
    arrays = {
        "header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
        "tokens": np.asarray(session.tokens, dtype=np.int32),
        "message_ids": np.asarray(
            [i for s in session.segments for i in s.message_ids], dtype=np.int32
        ),
        "context_tokens": np.asarray([t for c in session.snippet_writes for t in c.tokens], dtype=np.int32),
    }
    offsets = sorted(checkpoints)
    arrays["checkpoint_offsets"] = np.asarray(offsets, dtype=np.int32)
    for i, state in enumerate(states or []):
        arrays[f"state_{i}"] = np.asarray(state, dtype=np.float32)
        if offsets:
            arrays[f"checkpoint_{i}"] = np.stack([np.asarray(checkpoints[o][i], dtype=np.float32) for o in offsets])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)


def load_session_file(path: Path, fingerprint: str, legacy: str | None = None) -> Session:
    """Read a session file, checking every field; raises SessionFileError on anything odd.

    A file written before fingerprints hashed content carries `legacy`, the older fingerprint by
    file names, sizes and times: its history is kept (the KV and δ-states are rebuilt from it by
    replay) but its saved δ-states are not trusted, since that fingerprint misses a swapped file.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SessionFileError(f"unreadable: {exc}") from None
    try:
        header = json.loads(_array(arrays, "header", np.uint8).tobytes().decode("utf-8"))
        if not isinstance(header, dict):
            raise SessionFileError("header is not an object")
        if header.get("format") != FORMAT:
            raise SessionFileError(f"format {header.get('format')!r} is not {FORMAT}")
        if header.get("fingerprint") == fingerprint:
            return _session(header, arrays)
        if legacy is None or header.get("fingerprint") != legacy:
            raise SessionFileError("written for another model or adapter")
        log.info("session file %s predates content fingerprints: history kept, δ-states rebuilt", path.name)
        return dataclasses.replace(_session(header, arrays), saved_states=None)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, SessionFileError):
            raise
        raise SessionFileError(f"malformed: {exc!r}") from None


def _session(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Session:
    tokens = _array(arrays, "tokens", np.int32).tolist()
    ids = _array(arrays, "message_ids", np.int32).tolist()
    segments, position = [], 0
    for start, end, kind in header["segments"]:
        if kind not in _KINDS or start != position or not start < end <= len(tokens):
            raise SessionFileError(f"bad segment {[start, end, kind]}")
        seg_ids: tuple[int, ...] = ()
        if kind == "messages":
            seg_ids, ids = tuple(ids[: end - start]), ids[end - start :]
            if len(seg_ids) != end - start:
                raise SessionFileError("message ids are missing")
        segments.append(Segment(int(start), int(end), kind, seg_ids))
        position = end
    if position != len(tokens) or ids:
        raise SessionFileError("segments do not cover the tokens")
    flat = _array(arrays, "context_tokens", np.int32).tolist()
    writes, previous = [], 0
    for c in header["contexts"]:
        offset, length = int(c["offset"]), int(c["length"])
        if not previous <= offset <= len(tokens) or length < 0 or length > len(flat):
            raise SessionFileError("bad hidden-memory record")
        writes.append(SnippetWrite(offset, str(c["digest"]), tuple(flat[:length]), int(c["count"])))
        flat, previous = flat[length:], offset
    if flat:
        raise SessionFileError("stray hidden-memory tokens")
    states = [_array(arrays, f"state_{i}", np.float32) for i in range(int(header["layers"]))]
    return Session(
        key_hash=str(header["key_hash"]),
        delta=bool(header["delta"]),
        tokens=tokens,
        segments=segments,
        snippet_writes=writes,
        created=float(header["created"]),
        last_used=float(header["last_used"]),
        turns=int(header["turns"]),
        prefilled_tokens=int(header["prefilled_tokens"]),
        reused_tokens=int(header["reused_tokens"]),
        saved_states=states or None,
        saved_checkpoints=_checkpoints(arrays, states, len(tokens)),
    )


def _checkpoints(arrays: dict[str, np.ndarray], states: list[np.ndarray], length: int) -> dict[int, list[np.ndarray]]:
    if "checkpoint_offsets" not in arrays:
        return {}  # written before checkpoints existed
    offsets = _array(arrays, "checkpoint_offsets", np.int32).tolist()
    if offsets and not states:
        raise SessionFileError("checkpoints without δ-states")
    if offsets != sorted(set(offsets)) or not all(0 < o <= length for o in offsets):
        raise SessionFileError(f"bad checkpoint offsets {offsets[:8]}")
    if not offsets:
        return {}
    layers = [_array(arrays, f"checkpoint_{i}", np.float32) for i in range(len(states))]
    for i, (stacked, state) in enumerate(zip(layers, states)):
        if stacked.shape != (len(offsets), *state.shape):
            raise SessionFileError(f"'checkpoint_{i}' has shape {stacked.shape}")
    return {offset: [stacked[j] for stacked in layers] for j, offset in enumerate(offsets)}


def _array(arrays: dict[str, np.ndarray], name: str, dtype: type) -> np.ndarray:
    value = arrays.get(name)
    if value is None:
        raise SessionFileError(f"'{name}' is missing")
    if value.dtype != dtype:
        raise SessionFileError(f"'{name}' has dtype {value.dtype}, expected {np.dtype(dtype)}")
    return value
