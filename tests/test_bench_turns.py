"""bench.turns' in-process part on a short session: taking a chunk for the disk cache copies nothing, and
holding it makes MLX copy the session's whole K/V buffer at its next step (what the encoder thread
avoids by letting go of a chunk as soon as it has copied it); the chunk reads back into a new cache.
Its server parts run like bench.concurrency's."""

from __future__ import annotations

from bench import turns


def test_a_held_chunk_makes_the_sessions_next_step_copy_its_buffer_and_a_released_one_does_not() -> None:
    report = turns._take(16)
    buffer_mb = turns.QWEN3_4B_LAYERS * 2 * turns.QWEN3_4B_KV_HEADS * 256 * turns.QWEN3_4B_HEAD_DIM * 2 / 1e6
    assert report["chunk_mb"] == round(17 / 256 * buffer_mb, 1)  # its 16 tokens and one step
    assert report["step_while_held_extra_mb"] >= 0.95 * buffer_mb  # every layer's buffer, copied
    assert report["step_released_extra_mb"] < 0.1 * buffer_mb  # updated in place
    assert report["reader_thread_parse_ms"] > 0 and report["generation_thread_restore_ms"] > 0  # read back whole
