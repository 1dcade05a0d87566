"""δ-mem on the model format the presets ship: 4-bit MLX weights, made by mlx-lm's own `convert`.

The reference is the same 4-bit model dequantized into float weights, with the same adapter: δ must
give the same logits, δ-states and greedy tokens on both, in the runtime and through a real server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import openai
import pytest
from engine_support import job, run
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import dequantize_model, load_model
from server_process import KEY, MODEL, Server, start_server, stop_server

from common.settings import SidecarSettings
from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.api import set_delta_controls
from sidecar.engine.engine import Engine
from sidecar.engine.interface import TextDelta
from sidecar.sessions.keys import hash_session_key
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

BITS, GROUP_SIZE = 4, 64
TOL = dict(atol=1e-4, rtol=1e-4)
MESSAGES = [("system", "You are terse."), ("user", "Where did I leave my keys?")]
SNIPPETS = ("The user's keys are in the blue bowl.",)


@pytest.fixture(scope="module")
def q4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-bit model dir converted by `python -m mlx_lm convert`, and a δ adapter for it."""
    work = tmp_path_factory.mktemp("q4")
    # Every input dimension (128, 256) is a multiple of the group size, so every layer is quantized.
    float_dir = write_tiny_model(work / "float", hidden_size=128, head_dim=32, intermediate_size=256)
    adapter = write_tiny_adapter(work / "adapter", float_dir)
    argv = [
        sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(float_dir), "--mlx-path", str(work / "q4"),
        "-q", "--q-bits", str(BITS), "--q-group-size", str(GROUP_SIZE),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return work / "q4", adapter


def _models(q4: tuple[Path, Path]) -> tuple[nn.Module, nn.Module]:
    """The 4-bit model and its dequantized float copy, both with the adapter attached."""
    model_dir, adapter = q4
    quantized, _ = load_model(model_dir)
    dequantized, _ = load_model(model_dir)
    return attach_delta_mem(quantized, adapter), attach_delta_mem(dequantize_model(dequantized), adapter)


def _tokens(n: int) -> list[int]:
    return np.random.default_rng(3).integers(0, 700, size=n).tolist()


def test_convert_made_every_layer_4_bit(q4: tuple[Path, Path]) -> None:
    model_dir, _ = q4
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization"] == {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine"}
    quantized, dequantized = _models(q4)
    weighted = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    layers = [m for _, m in quantized.named_modules() if isinstance(m, weighted)]
    assert len(layers) > 10 and all(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in layers)
    assert {(m.bits, m.group_size) for m in layers} == {(BITS, GROUP_SIZE)}
    # δ wraps the quantized attention; the reference's is plain float.
    assert isinstance(quantized.layers[0].self_attn.base.q_proj, nn.QuantizedLinear)
    assert type(dequantized.layers[0].self_attn.base.q_proj) is nn.Linear


def test_delta_on_the_4_bit_model_equals_delta_on_its_dequantized_weights(q4: tuple[Path, Path]) -> None:
    quantized, dequantized = _models(q4)
    tokens = _tokens(100)
    caches = [make_prompt_cache(model) for model in (quantized, dequantized)]
    logits = [model(mx.array([tokens]), cache=cache) for model, cache in zip((quantized, dequantized), caches)]
    np.testing.assert_allclose(np.array(logits[0]), np.array(logits[1]), **TOL)
    for a, b in zip(delta_states(quantized, caches[0]), delta_states(dequantized, caches[1]), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), **TOL)
    # δ changes the 4-bit model's output: the comparison is not between two plain models.
    plain = make_prompt_cache(quantized)
    set_delta_controls(plain, enabled=False)
    assert not np.allclose(np.array(quantized(mx.array([tokens]), cache=plain)), np.array(logits[0]), atol=1e-2)

    quantized_tokens, quantized_state = _greedy(quantized, tokens[:40])
    dequantized_tokens, dequantized_state = _greedy(dequantized, tokens[:40])
    assert quantized_tokens == dequantized_tokens and len(quantized_tokens) == 16
    np.testing.assert_allclose(quantized_state, dequantized_state, **TOL)


def _greedy(model: nn.Module, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """16 greedy tokens after the prompt, and the last layer's δ-state after them."""
    cache = make_prompt_cache(model)
    tokens = [token for token, _ in generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=16)]
    return tokens, np.array(delta_states(model, cache)[-1])


@pytest.fixture
def q4_server(q4: tuple[Path, Path], tmp_path: Path) -> Iterator[Server]:
    model_dir, adapter = q4
    server = start_server(model_dir, adapter, tmp_path)
    yield server
    stop_server(server)


def test_a_server_on_the_4_bit_model_answers_like_the_dequantized_runtime(
    q4: tuple[Path, Path], q4_server: Server, tmp_path: Path
) -> None:
    client = openai.OpenAI(base_url=f"{q4_server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": role, "content": content} for role, content in MESSAGES],
        max_completion_tokens=12,
        temperature=0,
        extra_headers={"X-OpenClaw-Session-Key": "q4"},
        extra_body={"attention_state": list(SNIPPETS)},
    )
    assert raw.headers["X-Delta-Mode"] == "delta" and raw.headers["X-Delta-Attention-State-Count"] == "1"
    served = raw.parse().choices[0].message.content
    served_states = client.get("/session", cast_to=dict, options={"headers": {"X-OpenClaw-Session-Key": "q4"}})

    # The same request to the engine on the dequantized weights, in this process.
    model_dir, adapter = q4
    model, tokenizer = mlx_lm.load(str(model_dir))
    model = attach_delta_mem(dequantize_model(model), adapter)
    mx.eval(model.parameters())  # computed here, not lazily on the engine's worker thread
    settings = SidecarSettings(
        model_path=str(model_dir), model_id=MODEL, adapter_path=str(adapter), state_dir=str(tmp_path / "engine")
    )
    engine = Engine(model, tokenizer, settings)
    try:
        events = run(engine, job(MESSAGES, key="q4", snippets=SNIPPETS, max_tokens=12, temperature=0.0))
        stats: dict[str, Any] = asyncio.run(engine.session_stats(hash_session_key("q4")))
    finally:
        asyncio.run(engine.close())
    assert served and served == "".join(e.text for e in events if isinstance(e, TextDelta))
    for a, b in zip(served_states["delta"]["delta_state"], stats["delta"]["delta_state"], strict=True):
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-4) and a["norm"] > 0
