"""The disk cache against hostile or broken files (issue 22): a FIFO or a link in place of a chunk, a read
that stalls, a link out of the state dir, arrays of the wrong shape, fields that lie, a full disk.
Each time the turn is answered as a replay would answer it, nothing outside our own files is touched,
and /health says what happened."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from engine_support import SYSTEM, job, run, session_of
from test_kv_disk import TURNS, answer, chunk_files, prompt_done, replayed, start, stop, third_turn

from sidecar.engine.interface import Finished
from sidecar.kvcache import disk_cache, disk_files, disk_restore
from sidecar.kvcache.disk_files import KvFileError, read_manifest
from sidecar.kvcache.disk_index import History
from sidecar.sessions.keys import hash_session_key

TURN_TIMEOUT_S = 60.0


def two_turns(model: Path, adapter: Path, state: Path, keys: tuple[str, ...] = ("s1",)) -> None:
    engine = start(model, adapter, state)
    for messages in TURNS[:2]:
        for key in keys:
            run(engine, job(messages, key=key))
    stop(engine)


def newest_chunk(state: Path) -> Path:
    return max(chunk_files(state), key=lambda p: int(p.stem))


def rewrite_manifest(folder: Path, change: Any) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def run_within(engine: Any, chat_job: Any, unblock: Path | None = None) -> list[Any]:
    """A turn's events, failing (not hanging) after TURN_TIMEOUT_S; `unblock`: a FIFO opened for writing
    then, so that a reader blocked on it (the old behaviour) lets the engine stop."""

    async def collect() -> list[Any]:
        return [event async for event in engine.submit(chat_job)]

    async def bounded() -> list[Any]:
        return await asyncio.wait_for(collect(), TURN_TIMEOUT_S)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        if unblock is not None:
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"the turn did not end within {TURN_TIMEOUT_S} s")


# ---- F2: every file read is a bounded regular file, read off the generation thread -------------


def test_a_fifo_in_place_of_a_chunk_is_refused_at_once_and_the_turn_is_replayed(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)
    fifo = newest_chunk(state)
    fifo.unlink()
    os.mkfifo(fifo)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.kvcache.disk_cache"):
            events = run_within(engine, job(TURNS[2]), unblock=fifo)
        other = run_within(engine, job(TURNS[0], key="other"), unblock=fifo)  # nothing is wedged
        stats = engine.kv_disk.stats()
    finally:
        stop(engine)
    assert isinstance(other[-1], Finished)
    assert stats["partial_hits"] == 1 and stats["read_failures"] == 1
    assert "named pipe" in stats["last_read_error"]
    assert any("named pipe" in r.getMessage() and "replayed" in r.getMessage() for r in caplog.records)
    assert answer(events) == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


def test_a_link_in_place_of_a_chunk_is_not_followed(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)
    chunk = newest_chunk(state)
    outside = tmp_path / "elsewhere.safetensors"  # the very bytes, outside the state dir
    shutil.move(chunk, outside)
    chunk.symlink_to(outside)
    text, stats = third_turn(tiny_model_dir, tiny_adapter_dir, state, caplog)
    assert stats["hits"] == 0 and stats["partial_hits"] == 1 and stats["read_failures"] == 1
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]
    assert outside.exists()


def test_a_read_that_stalls_is_given_up_at_its_deadline_and_health_shows_it(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state, keys=("s1", "s2"))
    release, entered = threading.Event(), threading.Event()
    real_read = disk_restore.read_chunk_bytes

    def hanging(path: Path, sha256: str, nbytes: int) -> bytes:
        entered.set()
        release.wait()  # a file system that does not answer
        return real_read(path, sha256, nbytes)

    monkeypatch.setattr(disk_restore, "read_chunk_bytes", hanging)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    engine.kv_disk.reader.deadline_s = 1.0
    try:
        events = run_within(engine, job(TURNS[2]))
        assert entered.is_set()
        # While the first read hangs, the next restore does not queue behind it: it replays at once.
        second = run_within(engine, job(TURNS[2], key="s2"))
        health = asyncio.run(engine.health())
        release.set()
        stats = engine.kv_disk.stats()
    finally:
        release.set()
        stop(engine)
    assert isinstance(events[-1], Finished) and isinstance(second[-1], Finished)
    assert stats["stalled_reads"] >= 2 and stats["hits"] == 0 and stats["fallbacks"] >= 2
    assert "not return" in stats["last_read_error"]
    assert any("disk cache read has not returned" in problem for problem in health["problems"])
    assert answer(events) == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


def test_other_rows_decode_while_a_restore_waits_for_its_read(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)
    release, entered = threading.Event(), threading.Event()
    real_read = disk_restore.read_chunk_bytes

    def slow(path: Path, sha256: str, nbytes: int) -> bytes:
        entered.set()
        release.wait(TURN_TIMEOUT_S)  # a slow disk, well within the read's deadline
        return real_read(path, sha256, nbytes)

    monkeypatch.setattr(disk_restore, "read_chunk_bytes", slow)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)

    async def scenario() -> tuple[list[Any], list[Any], bool]:
        other = engine.submit(job(TURNS[0], key="other", max_tokens=48))
        first = await other.__anext__()  # its prompt is in: it decodes from now on
        restoring = engine.submit(job(TURNS[2]))
        await asyncio.to_thread(entered.wait, TURN_TIMEOUT_S)
        try:
            decoded = [first] + await asyncio.wait_for(_collect(other), TURN_TIMEOUT_S)
            read_still_pending = not release.is_set()
        finally:
            release.set()
        return decoded, await _collect(restoring), read_still_pending

    try:
        decoded, restored, read_still_pending = asyncio.run(scenario())
        stats = engine.kv_disk.stats()
    finally:
        release.set()
        stop(engine)
    assert read_still_pending and isinstance(decoded[-1], Finished) and decoded[-1].completion_tokens == 48
    assert isinstance(restored[-1], Finished) and stats["hits"] == 1 and stats["stalled_reads"] == 0


async def _collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


# ---- F3: the start-up scan never follows a link out of the state dir, never deletes what is not ours ----


def test_the_scan_leaves_a_linked_folder_and_files_that_are_not_ours_alone(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)
    sessions = state / "kv" / "sessions"
    own = next(sessions.iterdir())
    user = tmp_path / "user-folder"  # a folder of the user's, with a copied manifest in it
    user.mkdir()
    shutil.copy(own / "manifest.json", user / "manifest.json")
    for name in ("notes.txt", "7.safetensors", "thesis.pdf"):
        (user / name).write_text(f"the user's {name}")
    (sessions / ("f" * 64 + ".delta")).symlink_to(user, target_is_directory=True)
    (own / "notes.txt").write_text("not the disk cache's")  # a stranger in one of our folders
    broken = sessions / ("e" * 64 + ".base")  # a folder whose manifest fails: our files go, not the rest
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    (broken / "3.safetensors").write_bytes(b"ours")
    (broken / "keep.me").write_text("not ours")
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        events = run(engine, job(TURNS[2]))
        assert engine.kv_disk.stats()["hits"] == 1
    finally:
        stop(engine)
    assert isinstance(events[-1], Finished)
    assert sorted(p.name for p in user.iterdir()) == ["7.safetensors", "manifest.json", "notes.txt", "thesis.pdf"]
    assert (sessions / ("f" * 64 + ".delta")).is_symlink()
    assert (own / "notes.txt").exists()
    assert sorted(p.name for p in broken.iterdir()) == ["keep.me"]


# ---- F4: arrays that pass the checksum but not the model's layout; any rebuild failure is a replay ----


def drop_a_kv_head(chunk: Path) -> None:
    """Rewrite a chunk with one KV head fewer, and its manifest entry to match (sha256, nbytes)."""
    arrays, metadata = mx.load(str(chunk), return_metadata=True)
    arrays = {name: a[:, :1] if name[0] in "kv" and "." in name else a for name, a in arrays.items()}
    mx.save_safetensors(str(chunk), arrays, metadata=metadata)
    data = chunk.read_bytes()

    def entry(manifest: dict[str, Any]) -> None:
        for c in manifest["chunks"]:
            if c.get("file") == chunk.name:
                c["sha256"], c["nbytes"] = hashlib.sha256(data).hexdigest(), len(data)

    rewrite_manifest(chunk.parent, entry)


def test_a_chunk_of_the_wrong_shape_is_replayed_not_an_engine_error(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)
    drop_a_kv_head(newest_chunk(state))
    text, stats = third_turn(tiny_model_dir, tiny_adapter_dir, state, caplog)
    assert stats["partial_hits"] == 1
    assert any("does not fit this model's cache" in r.getMessage() for r in caplog.records)
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


def test_any_failure_to_rebuild_from_disk_is_a_replay(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)

    def broken(cache: list[Any], chunks: list[Any]) -> None:
        raise RuntimeError("[metal::malloc] something MLX did not expect")

    monkeypatch.setattr(disk_cache, "fill_cache", broken)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        events = run(engine, job(TURNS[2]))
        again = run(engine, job(TURNS[2]))  # a retry, too
        stats = engine.kv_disk.stats()
    finally:
        stop(engine)
    assert isinstance(events[-1], Finished) and isinstance(again[-1], Finished)
    assert stats["fallbacks"] >= 1 and stats["hits"] == 0 and stats["partial_hits"] == 0
    assert answer(events) == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


# ---- F6: every field read from disk is checked ------------------------------------------------------


def test_a_manifest_with_a_negative_size_does_not_switch_the_budget_off(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state, keys=("s1", "liar"))
    liar = state / "kv" / "sessions" / session_stem("liar")

    def negative(manifest: dict[str, Any]) -> None:
        manifest["chunks"][-1]["nbytes"] = -(10**15)

    rewrite_manifest(liar, negative)
    budget = sum(p.stat().st_size for p in (state / "kv").rglob("*.safetensors"))  # what is there now, no more
    engine = start(tiny_model_dir, tiny_adapter_dir, state, max_disk_bytes=budget)
    try:
        assert 0 < engine.kv_disk.stats()["bytes"] <= budget
        assert not liar.exists()  # refused at start-up: its files went
        run(engine, job(TURNS[2]))
        stats = engine.kv_disk.stats()
    finally:
        stop(engine)
    assert stats["hits"] == 1 and 0 < stats["bytes"] <= budget


def session_stem(key: str) -> str:
    return f"{hash_session_key(key)}.delta"


MANIFEST_LIES = {
    "negative size": lambda m: m["chunks"][-1].update(nbytes=-1),
    "size not an int": lambda m: m["chunks"][-1].update(nbytes="12"),
    "a gap between chunks": lambda m: m["chunks"][-1].update(start=m["chunks"][-1]["start"] + 1),
    "chunks out of order": lambda m: m["chunks"].reverse(),
    "an empty token range": lambda m: m["chunks"][-1].update(end=m["chunks"][-1]["start"]),
    "a path for a file name": lambda m: m["chunks"][-1].update(file="../../../etc/passwd"),
    "a dot-dot file name": lambda m: m["chunks"][-1].update(file="..safetensors"),
    "a prefix id that is not hex": lambda m: m["chunks"][0].update(prefix="../" + "0" * 29),
    "a checksum that is not hex": lambda m: m["chunks"][-1].update(sha256="z" * 64),
    "a negative time": lambda m: m.update(last_used=-5),
    "a file at or after next_file": lambda m: m.update(next_file=0),
    "a memory write outside its chunk": lambda m: m["chunks"][-1].update(writes=[[0, "d"]]),
}


@pytest.fixture(scope="module")
def written_manifest(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A manifest as the writer writes it: a shared prefix, then two chunks of the session's own."""
    state = tmp_path_factory.mktemp("manifest") / "state"
    two_turns(tiny_model_dir, tiny_adapter_dir, state)
    return json.loads(next((state / "kv" / "sessions").glob("*/manifest.json")).read_text())


@pytest.mark.parametrize("lie", sorted(MANIFEST_LIES))
def test_a_manifest_field_that_lies_is_refused(written_manifest: dict[str, Any], tmp_path: Path, lie: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(written_manifest))
    manifest = read_manifest(path)  # as written: valid
    assert manifest.chunks[0].prefix and len(manifest.chunks) == 3
    rewrite_manifest(tmp_path, MANIFEST_LIES[lie])
    with pytest.raises(KvFileError, match="malformed"):
        read_manifest(path)


PREFIX_LIES = {
    "negative size": {"nbytes": -1},
    "zero length": {"length": 0},
    "unknown mode": {"mode": "../x"},
    "a digest that is not hex": {"tokens_sha256": "x"},
    "an extra field": {"path": "/etc/passwd"},
}


@pytest.mark.parametrize("lie", sorted(PREFIX_LIES))
def test_a_prefix_record_field_that_lies_is_refused(tmp_path: Path, lie: str) -> None:
    record = disk_files.PrefixRecord("fp", "delta", 10, "a" * 64, "b" * 64, 100, 1.0)
    path = tmp_path / ("c" * 32 + ".json")
    disk_files.write_prefix_record(path, record)
    assert disk_files.read_prefix_record(path) == record
    path.write_text(json.dumps({**json.loads(path.read_text()), **PREFIX_LIES[lie]}))
    with pytest.raises(KvFileError, match="malformed"):
        disk_files.read_prefix_record(path)


# ---- F7: a restore of an unchanged session is a full hit ----------------------------------------


def test_a_restarted_session_is_a_full_hit_when_its_next_turn_sends_the_real_answer(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenClaw's way: each request ends with an internal-context message that the next one drops,
    and the next one carries the answer as the server gave it."""
    history: list[tuple[str, str]] = [("system", "You are a careful assistant with tools. " * 30)]
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    for turn in range(2):
        history.append(("user", f"question {turn}"))
        events = run(engine, job([*history, ("user", f"[internal context {turn}]")], max_tokens=12))
        history.append(("assistant", answer(events)))
    stop(engine)
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.kvcache.disk_cache"):
            done = prompt_done(run(engine, job([*history, ("user", "question 2"), ("user", "[internal context 2]")])))
        stats = engine.kv_disk.stats()
        before_new_turn = len(engine.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in history]))
    finally:
        stop(engine)
    assert stats["hits"] == 1 and stats["partial_hits"] == 0 and stats["fallbacks"] == 0
    assert not [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
    # Everything up to the new turn came from disk (less at most the 63 tokens before a kept δ-state).
    assert done.cached_tokens >= before_new_turn - 64


def test_a_restore_uses_the_newest_chunk_on_disk_as_far_as_it_agrees_with_the_history(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a kill -9 between a turn's session save and its chunk write leaves (or a failed or skipped
    write): the session's history is a turn ahead of its files, so the newest chunk on disk holds the
    turn before with its internal-context message, which the history no longer has. The chunk agrees
    with the history up to that message: that much is read (before: the whole chunk was refused, and
    the long question before it replayed)."""

    def lost(path: Path, data: bytes) -> str:
        raise OSError(errno.EIO, "Input/output error")

    question = ("user", "Please look at these files: " + " ".join(f"notes/{i}.md" for i in range(60)))
    question_0 = [("system", SYSTEM), question]
    turns = [[*question_0, ("user", "[internal context 0]")]]
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    turns.append([*question_0, ("assistant", answer(run(engine, job(turns[0], max_tokens=6)))), ("user", "next")])
    asyncio.run(engine.save_session(hash_session_key("s1")))  # turn 0's chunks are on disk
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(disk_files, "write_chunk_file", lost)
        turns.append([*turns[1], ("assistant", answer(run(engine, job(turns[1], max_tokens=6)))), ("user", "last")])
        stop(engine)  # turn 1 is saved with the session, not on disk
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.kvcache.disk_cache"):
            events = run(engine, job(turns[2], max_tokens=6))
        stats, replay_checks = engine.kv_disk.stats(), (engine.replays.checks, engine.replays.mismatches)
        through_question = len(engine.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in question_0]))
    finally:
        stop(engine)
    assert stats["hits"] == 0 and stats["partial_hits"] == 1  # honest: turn 1 was never on disk
    # The chunk agrees with the history through the question and the next message's `<|im_start|>`.
    assert any(f"than the history from token {through_question + 1}" in r.getMessage() for r in caplog.records)
    assert prompt_done(events).cached_tokens >= through_question - 64  # the question came from disk
    assert replay_checks[0] >= 1 and replay_checks[1] == 0  # the δ-states as saved after turn 1
    reference = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference", max_disk_bytes=0)
    try:
        assert [answer(run(reference, job(t, max_tokens=6))) for t in turns][-1] == answer(events)
    finally:
        stop(reference)


AGREEMENT_CASES = {
    # name: (chunk's writes, history's writes, history's tokens from 7 on differ) -> (agreed, what differs)
    "all agree": ([(4, "m")], [(4, "m")], False, (12, None)),
    "tokens differ from 7": ([(4, "m"), (9, "n")], [(4, "m")], True, (7, "tokens")),
    "a write before 7 only the chunk has": ([(4, "m")], [], True, (2, "memory writes")),
    "a write at 7 only the chunk has": ([(7, "m")], [], True, (6, "memory writes")),
    "a write at 7 both have": ([(7, "m")], [(7, "m")], True, (7, "tokens")),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT_CASES))
def test_a_chunk_is_used_as_far_as_its_tokens_and_memory_writes_agree_with_the_history(case: str) -> None:
    ours, theirs, differ, expected = AGREEMENT_CASES[case]
    stored = list(range(2, 12))
    tokens = list(range(12)) if not differ else [*range(7), *(100 + t for t in range(7, 12))]
    entry = disk_files.ChunkEntry(2, 12, "0.safetensors", "a" * 64, 1, writes=ours)
    assert disk_restore._agreement(entry, stored, History(tuple(tokens), tuple(theirs)), 12) == expected


# ---- F9b: write failures show on /health until a write works again ------------------------------


def test_write_failures_make_health_degraded_until_a_write_works_again(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, data: bytes) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    try:
        assert asyncio.run(engine.health())["problems"] == []
        with monkeypatch.context() as patch:
            patch.setattr(disk_files, "write_chunk_file", full)
            run(engine, job(TURNS[0]))
            asyncio.run(engine.save_session(hash_session_key("s1")))  # once its disk writes are done (here: failed)
            problems = asyncio.run(engine.health())["problems"]
        failures = engine.kv_disk.stats()["write_failures"]
        assert failures >= 1
        assert problems == [f"the disk cache cannot write: the disk is full ({failures} failed writes so far)"]
        run(engine, job(TURNS[1]))
        asyncio.run(engine.save_session(hash_session_key("s1")))
        assert asyncio.run(engine.health())["problems"] == []
        assert engine.kv_disk.stats()["last_error"] == "the disk is full"  # the record stays, the problem went
    finally:
        stop(engine)
    assert session_of(engine).tokens
