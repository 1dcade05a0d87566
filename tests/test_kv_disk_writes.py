"""The disk cache's writer and its checks, through the engine: a turn's chunks are encoded off the
generation thread (and read back as they were, by MLX and by the reader thread's parser, in every dtype
a cache holds; a file that lies about its arrays is refused), a restore rejects
a chunk whose memory writes differ from the session's history, files are the owner's only, a full
write queue defers a turn to the next one without holding up any answer, and shutdown waits for the
queued chunks.

A stuck disk is `disk_files.write_chunk_file` (the module-level function the writer calls for every
chunk file) replaced by one that waits for the test's word.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import queue
import stat
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from engine_support import job, patch_function, run
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from server_process import wait_until
from test_kv_disk import TURNS, answer, replayed, start, stop

from sidecar.delta.cache_chunks import CacheLayout, cache_chunk, kv_layout
from sidecar.engine import decoding
from sidecar.engine.engine import Engine
from sidecar.engine.interface import ChatJob, Finished
from sidecar.kvcache import disk_files, disk_writer
from sidecar.sessions.keys import hash_session_key

BEES = ("the user keeps bees",)
DEADLINE_S = 60.0


class StuckDisk:
    """write_chunk_file that blocks until released; `entered` is set once the writer is inside."""

    def __init__(self) -> None:
        self.real = disk_files.write_chunk_file
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: Path, data: bytes) -> str:
        self.entered.set()
        assert self.release.wait(DEADLINE_S)
        return self.real(path, data)


def manifest(state: Path, key: str) -> dict[str, Any]:
    return json.loads((state / "kv" / "sessions" / f"{hash_session_key(key)}.delta" / "manifest.json").read_text())


def health(engine: Engine) -> dict[str, Any]:
    return asyncio.run(engine.health())


def run_within_deadline(engine: Engine, request: ChatJob) -> list[Any]:
    """A job's events; fails (instead of hanging) if the generation thread does not answer in time."""

    async def collect() -> list[Any]:
        return [event async for event in engine.submit(request)]

    return asyncio.run(asyncio.wait_for(collect(), DEADLINE_S))


def test_a_turns_chunks_are_encoded_off_the_generation_thread_and_restore_exactly(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Encoding copies every byte of a chunk (a first OpenClaw turn is ~1 GB on a Mac): on the
    # generation thread it would stall every running row and the next turn.
    encoders: list[threading.Thread] = []
    steps: set[threading.Thread] = set()
    real_encode, real_step = disk_files.encode_chunk, decoding.step

    def encode(*args: Any) -> Any:
        encoders.append(threading.current_thread())
        return real_encode(*args)

    def step(*args: Any) -> Any:
        steps.add(threading.current_thread())
        return real_step(*args)

    patch_function(monkeypatch, disk_files, "encode_chunk", encode)
    patch_function(monkeypatch, decoding, "step", step)
    state = tmp_path / "state"
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    for messages in TURNS[:2]:
        run(engine, job(messages))
    stop(engine)
    assert len(steps) == 1 and len(encoders) == 3  # the shared prefix, then one chunk per turn
    assert steps.isdisjoint(encoders)
    restarted = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        text = answer(run(restarted, job(TURNS[2])))
        disk = health(restarted)["disk_cache"]
    finally:
        stop(restarted)
    assert (disk["hits"], disk["partial_hits"], disk["fallbacks"]) == (1, 0, 0)
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits", [None, 8])
def test_an_encoded_chunk_reads_back_as_the_caches_arrays(dtype: mx.Dtype, bits: int | None) -> None:
    # Every test model is float32; Qwen3's K/V are bfloat16, which numpy has no dtype for.
    layers = [KVCache() if bits is None else QuantizedKVCache(group_size=32, bits=bits) for _ in range(2)]
    for layer in layers:
        for length in (70, 5):  # a buffer with room left, as a session's is between turns
            keys = mx.random.normal((1, 2, length, 64)).astype(dtype)
            layer.update_and_fetch(keys, keys * 2)
    chunk = cache_chunk(layers, 30)  # strided views into the middle of each buffer
    encoded = disk_files.encode_chunk(disk_files.chunk_on_host(chunk), list(range(30, 75)), "model-a")
    arrays, metadata = mx.load(io.BytesIO(bytes(encoded)), format="safetensors", return_metadata=True)
    assert metadata == {"format": "1", "fingerprint": "model-a", "start": "30", "end": "75", "records": "[null, null]"}
    assert np.array(arrays.pop("tokens")).tolist() == list(range(30, 75))
    assert sorted(arrays) == sorted(chunk.arrays) and len(arrays) == (4 if bits is None else 12)
    for name, array in chunk.arrays.items():
        assert arrays[name].dtype == array.dtype and arrays[name].shape == array.shape
        assert mx.array_equal(arrays[name], array).item(), name
    # The sidecar's own reader: parsed on another thread (as the reader thread does), viewed here.
    parsed: dict[str, disk_files.ParsedChunk] = {}
    reader = threading.Thread(target=lambda: parsed.update(p=disk_files.parse_chunk(bytes(encoded), "1", "model-a")))
    reader.start()
    reader.join()
    assert parsed["p"].tokens == list(range(30, 75)) and (parsed["p"].start, parsed["p"].end) == (30, 75)
    layout = CacheLayout(kv_layout(chunk), (None, None))
    decoded = disk_files.decode_chunk(parsed["p"], "1", layout)
    for name, array in chunk.arrays.items():
        assert decoded.arrays[name].dtype == array.dtype and mx.array_equal(decoded.arrays[name], array).item(), name


def _chunk_bytes(header: dict[str, Any], payload: bytes = bytes(8)) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + payload


_METADATA = {"format": "1", "fingerprint": "model-a", "start": "0", "end": "2", "records": "[]"}
_TOKENS = {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}


def _lying(tokens: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> bytes:
    return _chunk_bytes({"__metadata__": {**_METADATA, **(metadata or {})}, "tokens": {**_TOKENS, **(tokens or {})}})


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(struct.pack("<Q", 1 << 40) + b"{}", id="header-past-the-end"),
        pytest.param(b"\x01\x02", id="shorter-than-its-size-field"),
        pytest.param(struct.pack("<Q", 5) + b"{not}" + bytes(8), id="header-not-json"),
        pytest.param(_chunk_bytes({"tokens": _TOKENS}), id="no-metadata"),
        pytest.param(_lying(tokens={"dtype": "F64"}), id="dtype"),
        pytest.param(_lying(tokens={"data_offsets": [0, 80]}), id="offsets-past-the-end"),
        pytest.param(_lying(tokens={"shape": [3]}), id="shape-not-its-bytes"),
        pytest.param(_lying(tokens={"shape": [-2]}), id="negative-shape"),
        pytest.param(_lying(tokens={"shape": [1, 2]}), id="tokens-not-a-list"),
        pytest.param(_lying(metadata={"end": "3"}), id="token-count"),
        pytest.param(_lying(metadata={"records": "{}"}), id="records"),
    ],
)
def test_a_chunk_file_that_lies_about_its_arrays_is_refused(data: bytes) -> None:
    with pytest.raises(disk_files.KvFileError):
        disk_files.parse_chunk(data, "1", "model-a")


def test_a_well_formed_chunk_file_of_another_model_is_refused() -> None:
    data = _chunk_bytes({"__metadata__": _METADATA, "tokens": _TOKENS}, struct.pack("<2i", 7, 8))
    assert disk_files.parse_chunk(data, "1", "model-a").tokens == [7, 8]
    with pytest.raises(disk_files.KvFileError, match="another model"):
        disk_files.parse_chunk(data, "1", "model-b")


def test_a_chunk_whose_memory_writes_differ_from_the_history_is_not_restored(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    first = start(tiny_model_dir, tiny_adapter_dir, state)
    run(first, job(TURNS[0], snippets=BEES))
    stop(first)
    path = state / "kv" / "sessions" / f"{hash_session_key('s1')}.delta" / "manifest.json"
    data = json.loads(path.read_text())
    written = [entry for entry in data["chunks"] if entry["writes"]]
    assert len(written) == 1 and len(written[0]["writes"]) == 1
    written[0]["writes"][0][1] = "0" * 64  # same tokens, same file: another memory write's digest
    path.write_text(json.dumps(data))

    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.kvcache.disk_cache"):
            text = answer(run(engine, job(TURNS[1])))
        disk = health(engine)["disk_cache"]
    finally:
        stop(engine)
    assert disk["hits"] == 0 and disk["partial_hits"] + disk["fallbacks"] == 1
    assert any("other memory writes than the history" in r.getMessage() for r in caplog.records)
    reference = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference", max_disk_bytes=0)
    try:
        run(reference, job(TURNS[0], snippets=BEES))
        assert text == answer(run(reference, job(TURNS[1])))
    finally:
        stop(reference)


def test_the_disk_cache_files_are_the_owners_only(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path) -> None:
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    run(engine, job(TURNS[0], snippets=BEES))
    stop(engine)
    files = [p for p in (tmp_path / "state" / "kv").rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".safetensors", ".json"} <= kinds and any(p.name == "manifest.json" for p in files)
    assert [p.name for p in files if stat.S_IMODE(p.stat().st_mode) & 0o077] == []


def test_a_stuck_writer_holds_up_no_answer_and_a_full_queue_is_written_with_the_next_turn(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    stuck = StuckDisk()
    monkeypatch.setattr(disk_writer, "QUEUE_LENGTH", 1)
    patch_function(monkeypatch, disk_files, "write_chunk_file", stuck)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        run_within_deadline(engine, job(TURNS[0], key="a"))  # its shared prefix: the writer sticks on it
        assert stuck.entered.wait(DEADLINE_S)
        run_within_deadline(engine, job(TURNS[0], key="b"))  # a's chunk waits in the queue: b's is skipped
        for messages in TURNS[:2]:  # answers go on while the disk is stuck
            assert isinstance(run_within_deadline(engine, job(messages, key="c"))[-1], Finished)
        disk = health(engine)["disk_cache"]
        assert disk["skipped_writes"] >= 2 and disk["writes"] == 0
    finally:
        stuck.release.set()
    # The disk is back: the writer takes up the waiting chunk.
    wait_until(lambda: not health(engine)["disk_cache"]["queued"], "the waiting chunk's write", DEADLINE_S)
    run(engine, job(TURNS[1], key="b"))  # b's next turn writes what the skipped one did not
    stop(engine)
    restarted = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        text = answer(run(restarted, job(TURNS[2], key="b")))
        disk = health(restarted)["disk_cache"]
        assert disk["hits"] == 1 and disk["partial_hits"] == 0 and disk["fallbacks"] == 0
    finally:
        stop(restarted)
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


def test_shutdown_waits_for_the_queued_chunks(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    stuck = StuckDisk()
    patch_function(monkeypatch, disk_files, "write_chunk_file", stuck)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    closer = threading.Thread(target=stop, args=(engine,))
    try:
        run_within_deadline(engine, job(TURNS[0]))  # the prefix's chunk sticks; the session's waits behind it
        assert stuck.entered.wait(DEADLINE_S)
        tokens = asyncio.run(engine.session_stats(hash_session_key("s1")))["delta"]["tokens"]
        closer.start()
        closer.join(timeout=2.0)
        assert closer.is_alive()  # still waiting for the writer
    finally:
        stuck.release.set()
    closer.join(DEADLINE_S)
    assert not closer.is_alive()
    assert manifest(state, "s1")["chunks"][-1]["end"] == tokens  # written before close returned


def test_a_session_restored_from_disk_joins_a_running_batch_and_answers_as_alone(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = start(tiny_model_dir, tiny_adapter_dir, state)
    run(first, job(TURNS[0], snippets=BEES))
    stop(first)
    engine = start(tiny_model_dir, tiny_adapter_dir, state)

    async def beside_a_decoding_row() -> list[Any]:
        decoding_now, restored_done = asyncio.Event(), asyncio.Event()

        async def long_row() -> list[Any]:
            stream = engine.submit(job([("user", "row a")], key="long", max_tokens=3000))
            events = []
            async for event in stream:
                events.append(event)
                decoding_now.set()
                if restored_done.is_set():
                    stream.cancel()  # it decoded through the whole restored turn
            return events

        task = asyncio.create_task(long_row())
        await decoding_now.wait()
        events = [event async for event in engine.submit(job(TURNS[1]))]
        restored_done.set()
        long_events = await task
        assert long_events[-1] == Finished("cancelled", long_events[-1].completion_tokens)
        return events

    try:
        events = asyncio.run(asyncio.wait_for(beside_a_decoding_row(), DEADLINE_S))
        report = health(engine)
    finally:
        stop(engine)
    assert report["disk_cache"]["hits"] == 1 and report["batch"]["mean_occupancy"] > 1
    # The restored δ-states matched the ones saved with the session: the disk gave them, exactly.
    assert (report["sessions"]["replay_checks"], report["sessions"]["replay_mismatches"]) == (1, 0)
    reference = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference", max_disk_bytes=0)
    try:
        run(reference, job(TURNS[0], snippets=BEES))
        expected = run(reference, job(TURNS[1]))
    finally:
        stop(reference)
    assert answer(events) == answer(expected)
    (tokens, states), (alone_tokens, alone_states) = saved(state), saved(tmp_path / "reference")
    assert np.array_equal(tokens, alone_tokens) and len(states) == 2
    for mine, theirs in zip(states, alone_states, strict=True):
        assert float(np.max(np.abs(mine - theirs))) <= 1e-4


def saved(state: Path, key: str = "s1") -> tuple[np.ndarray, list[np.ndarray]]:
    """A session's tokens and δ-states as its session file holds them."""
    with np.load(state / f"{hash_session_key(key)}.delta.session.npz", allow_pickle=False) as data:
        layers = sorted((n for n in data.files if n.startswith("state_")), key=lambda n: int(n[6:]))
        return data["tokens"], [data[n] for n in layers]


class _HeldQueue(queue.Queue):
    """A write queue whose writer takes nothing until `opened` is set."""

    opened = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        assert self.opened.wait(DEADLINE_S)
        return super().get(block, timeout)


def test_writes_queued_for_a_deleted_session_are_dropped(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer's queue comes from `disk_writer.queue` (the module-level name): held, the chunks of
    # a turn wait in it while the session is deleted.
    held = type("HeldQueue", (_HeldQueue,), {"opened": threading.Event()})
    monkeypatch.setattr(disk_writer, "queue", SimpleNamespace(Queue=held, Full=queue.Full))
    state = tmp_path / "state"
    engine = start(tiny_model_dir, tiny_adapter_dir, state)
    try:
        run(engine, job(TURNS[0]))
        # Queued once the answer has ended, just after its last event: the shared prefix and the session's chunk.
        wait_until(lambda: health(engine)["disk_cache"]["queued"] >= 2, "both chunks queued", DEADLINE_S)
        assert asyncio.run(engine.reset_session(hash_session_key("s1")))
    finally:
        held.opened.set()
    stop(engine)  # the writer has gone through the queue
    disk = health(engine)["disk_cache"]
    assert disk["writes"] == 1 and disk["write_failures"] == 0  # the shared prefix only
    assert list((state / "kv" / "sessions").iterdir()) == []
