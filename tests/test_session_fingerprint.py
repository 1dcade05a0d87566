"""Saved sessions are tied to the content of the model and adapter files, not to their names and times."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest
from engine_support import job, run, settings_for

from sidecar.engine.engine import Engine, load_engine
from sidecar.sessions.files import load_session_file, save_session_file
from sidecar.sessions.fingerprint import SessionFingerprint, content_fingerprint, legacy_fingerprint
from sidecar.sessions.keys import hash_session_key
from sidecar.testing.tiny_model import write_tiny_adapter

KEY = "fingerprinted"


def engine_on(model: Path, adapter: Path, state: Path) -> Engine:
    return load_engine(settings_for(model, adapter, state))


def stats(engine: Engine) -> dict | None:
    return asyncio.run(engine.session_stats(hash_session_key(KEY)))


def close(engine: Engine) -> None:
    asyncio.run(engine.close())


def swap_keeping_names_sizes_and_times(adapter: Path, model: Path, scratch: Path) -> None:
    """Replace the adapter's weights by another adapter's, with the same shapes and timestamps."""
    weights = adapter / "delta_mem_adapter_mlx.npz"
    before = weights.stat()
    other = write_tiny_adapter(scratch, model, seed=99)
    shutil.copyfile(other / "delta_mem_adapter_mlx.npz", weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_swapped_adapter_with_the_same_names_sizes_and_times_ignores_old_sessions(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter, state = tmp_path / "adapter", tmp_path / "state"
    shutil.copytree(tiny_adapter_dir, adapter)
    first = engine_on(tiny_model_dir, adapter, state)
    run(first, job([("user", "remember this")], key=KEY))
    close(first)
    unchanged = engine_on(tiny_model_dir, adapter, state)
    assert stats(unchanged) is not None, "the same files must find their sessions again"
    close(unchanged)

    swap_keeping_names_sizes_and_times(adapter, tiny_model_dir, tmp_path / "other")
    with caplog.at_level(logging.WARNING, logger="sidecar.sessions.store"):
        swapped = engine_on(tiny_model_dir, adapter, state)
        assert stats(swapped) is None, "the old adapter's δ-states were served as the new one's"
    close(swapped)
    assert "written for another model or adapter" in caplog.text


def test_every_file_the_loaders_read_is_in_the_fingerprint(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_adapter_dir, adapter)
    original = content_fingerprint(str(model), str(adapter))
    (model / "README.md").write_text("notes")  # not read by mlx-lm: no change
    (adapter / "delta_mem_adapter.pt").write_bytes(b"unused while the npz is there")
    assert content_fingerprint(str(model), str(adapter)) == original
    for path in [*model.iterdir(), adapter / "delta_mem_config.json", adapter / "delta_mem_adapter_mlx.npz"]:
        if path.name == "README.md":
            continue
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size
        assert content_fingerprint(str(model), str(adapter)) != original, f"{path.name} is not fingerprinted"
        path.write_bytes(data)


def test_files_from_before_content_fingerprints_keep_their_history_not_their_states(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    engine = engine_on(tiny_model_dir, tiny_adapter_dir, state)
    run(engine, job([("user", "written by an older version")], key=KEY))
    close(engine)
    path = state / f"{hash_session_key(KEY)}.delta.session.npz"
    saved = load_session_file(path, engine.store.fingerprint.current)
    old = legacy_fingerprint("tiny", str(tiny_model_dir), str(tiny_adapter_dir))
    save_session_file(path, saved, old, saved.saved_states, {})
    with caplog.at_level(logging.INFO, logger="sidecar.sessions.store"):
        kept = load_session_file(path, "sha256:new", legacy=old)
    assert kept.tokens == saved.tokens and kept.saved_states is None
    assert "predates content fingerprints" in caplog.text
    with pytest.raises(ValueError, match="another model or adapter"):
        load_session_file(path, "sha256:new", legacy="0" * 32)


def test_a_model_loaded_again_reuses_its_hash_until_a_file_changes(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_adapter_dir, adapter)
    first = SessionFingerprint("m", str(model), str(adapter))
    again = SessionFingerprint("m", str(model), str(adapter))  # an idle unload, then a load: no second hash
    assert again._content is first._content and again.current == first.current
    weights = adapter / "delta_mem_adapter_mlx.npz"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size; its change time moves
    changed = SessionFingerprint("m", str(model), str(adapter))
    assert changed._content is not first._content and changed.current != first.current
