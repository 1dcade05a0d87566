"""Where the files that bench/ and tests/ both read live in this repository (never outside it)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Two requests of a real OpenClaw 2026.9.6 agent session (see the README beside it).
OPENCLAW_TURNS = REPO / "tests" / "fixtures" / "openclaw" / "agent-turns.json"
# Qwen's rank file and the tokenizer.json built from it (sidecar.testing.qwen_vocab); git-ignored.
QWEN_VOCAB_CACHE = REPO / ".cache" / "qwen-vocab"
