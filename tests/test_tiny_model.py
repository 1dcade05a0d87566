"""The tiny model and adapter generator: loadable by mlx-lm, deterministic, Qwen3-shaped chat rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from bench.repo_files import OPENCLAW_TURNS
from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.adapter_files import (
    NPZ_FILE,
    PT_FILE,
    expected_shapes,
    load_adapter,
    model_dims,
    validate_adapter,
)
from sidecar.delta.config import CONFIG_FILE, DeltaMemConfig, tensor_key
from sidecar.delta.torch_archive import read_torch_archive
from sidecar.engine.interface import ChatMessage
from sidecar.engine.prompts import render_prompt
from sidecar.testing.tiny_model import ADDED_TOKENS, SPECIAL_TOKENS, write_tiny_adapter, write_tiny_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — ünïcode stays as is",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "list_notes", "parameters": {"type": "object", "properties": {}}},
    },
]
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in TOOLS)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, TokenizerWrapper]:
    return mlx_lm.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tokenizer(loaded: tuple[Any, TokenizerWrapper]) -> TokenizerWrapper:
    return loaded[1]


def render(tokenizer: TokenizerWrapper, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


# --- the model dir ------------------------------------------------------------------------------


def test_model_loads_and_runs_with_sensible_logits(
    loaded: tuple[Any, TokenizerWrapper], tiny_model_dir: Path
) -> None:
    model, tokenizer = loaded
    config = json.loads((tiny_model_dir / "config.json").read_text())
    ids = tokenizer.encode("The user prefers tea over coffee.")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])
    values = np.array(logits.astype(mx.float32))
    assert np.isfinite(values).all()
    assert 0.3 < values.std() < 3.0  # random but O(1), like the parity models


def test_config_matches_the_tokenizer(tiny_model_dir: Path, tokenizer: TokenizerWrapper) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] == 16
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config["vocab_size"] >= len(tokenizer.get_vocab())
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 1e6
    assert tokenizer.eos_token_ids == {config["eos_token_id"]}
    dims = model_dims(config)
    assert (dims.hidden_size, dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (
        64,
        2,
        4,
        2,
        16,
    )


def test_weights_follow_the_parity_recipe(tiny_model_dir: Path) -> None:
    weights = {k: np.array(v) for k, v in mx.load(str(tiny_model_dir / "model.safetensors")).items()}
    assert abs(weights["model.embed_tokens.weight"].std() - 1.0) < 0.05
    assert abs(weights["model.layers.0.mlp.down_proj.weight"].std() - 128**-0.5) < 0.01
    norm = weights["model.layers.1.self_attn.q_norm.weight"]
    assert norm.shape == (16,) and abs(norm.mean() - 1.0) < 0.1 and norm.std() > 0.01
    assert not any(key.endswith(".bias") for key in weights)


def test_generation_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    for path in tiny_model_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = write_tiny_model(tmp_path / "other", seed=5)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_qwen2_model_has_biases_and_no_qk_norms(tiny_qwen2_model_dir: Path) -> None:
    model, tokenizer = mlx_lm.load(str(tiny_qwen2_model_dir))
    assert model.args.model_type == "qwen2"
    attention = model.layers[0].self_attn
    assert "bias" in attention.q_proj and "bias" in attention.v_proj
    assert not hasattr(attention, "q_norm")
    assert "head_dim" not in json.loads((tiny_qwen2_model_dir / "config.json").read_text())
    logits = model(mx.array([tokenizer.encode("hello")]))
    assert np.isfinite(np.array(logits)).all()


def test_bfloat16_model_loads(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "bf16", dtype="bfloat16", num_layers=1)
    assert all(v.dtype == mx.bfloat16 for v in mx.load(str(path / "model.safetensors")).values())
    model, tokenizer = mlx_lm.load(str(path))
    assert model(mx.array([tokenizer.encode("hi")])).dtype == mx.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_type": "qwen2", "head_dim": 8}, "head_dim"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_model_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_tiny_model(tmp_path / "bad", **kwargs)


# --- the tokenizer ------------------------------------------------------------------------------


def test_tokenizer_vocabulary(tokenizer: TokenizerWrapper) -> None:
    vocab = tokenizer.get_vocab()
    assert 300 <= len(vocab) <= 1100
    for token in SPECIAL_TOKENS + ADDED_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]], token
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode(
        "hello", add_special_tokens=False
    )


def test_tokenizer_wrapper_detects_qwen_tool_calling(tokenizer: TokenizerWrapper) -> None:
    assert tokenizer.has_chat_template
    assert tokenizer.has_tool_calling
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert tokenizer.tool_parser('{"name": "f", "arguments": {"a": 1}}') == {
        "name": "f",
        "arguments": {"a": 1},
    }


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_unicode_round_trips(tokenizer: TokenizerWrapper, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(
    "text",
    [
        "e\u0301 vs \u00e9, ﬁ ligature, Ω vs \u2126",  # no normaliser: NFC/NFKC-distinct text survives
        "tabs\tand\r\nnewlines\n\n  indented",
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>',
        "東京 🙂👍🏽 \x01\x1f",  # not \x00: mlx-lm's streaming detokenizer drops byte 0 (its bug)
    ],
)
def test_tricky_text_round_trips_and_streams(tokenizer: TokenizerWrapper, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text


# --- the chat template --------------------------------------------------------------------------


def test_system_and_consecutive_user_turns(tokenizer: TokenizerWrapper) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "internal context"},
    ]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>user\ninternal context<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(tokenizer, messages[1:2], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_tools_go_into_the_system_turn(tokenizer: TokenizerWrapper) -> None:
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    assert render(tokenizer, with_system, tools=TOOLS, add_generation_prompt=True) == (
        f"<|im_start|>system\nBe brief.\n\n{TOOLS_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    )
    without_system = with_system[1:]
    assert render(tokenizer, without_system, tools=TOOLS, add_generation_prompt=True) == (
        f"<|im_start|>system\n{TOOLS_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_calls_and_grouped_tool_results(tokenizer: TokenizerWrapper) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Zürich and my notes?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
                },
                {"id": "c2", "type": "function", "function": {"name": "list_notes", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 °C"},
        {"role": "tool", "tool_call_id": "c2", "content": "[]"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"function": {"name": "f", "arguments": '{"a": [1, 2]}'}}],
        },
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "It is 12 °C."},
        {"role": "user", "content": "Thanks"},
    ]
    assert render(tokenizer, messages, tools=TOOLS, add_generation_prompt=True) == (
        f"<|im_start|>system\nS\n\n{TOOLS_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich and my notes?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "list_notes", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12 °C\n</tool_response>\n"
        "<tool_response>\n[]\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 12 °C.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_assistant_without_content_and_tool_result_first(tokenizer: TokenizerWrapper) -> None:
    messages = [
        {"role": "tool", "content": "early result"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "g", "arguments": {}}}]},
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>user\n<tool_response>\nearly result\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_developer_is_treated_as_system(tokenizer: TokenizerWrapper) -> None:
    first = [{"role": "developer", "content": "D"}, {"role": "user", "content": "U"}]
    assert render(tokenizer, first) == "<|im_start|>system\nD<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    assert render(tokenizer, first, tools=TOOLS).startswith(
        f"<|im_start|>system\nD\n\n{TOOLS_PROMPT}<|im_end|>\n"
    )
    later = [
        {"role": "user", "content": "U"},
        {"role": "developer", "content": "D"},
        {"role": "system", "content": "S"},
    ]
    assert render(tokenizer, later) == (
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>system\nD<|im_end|>\n<|im_start|>system\nS<|im_end|>\n"
    )


def test_non_string_content_renders_empty_like_qwen(tokenizer: TokenizerWrapper) -> None:
    # Qwen3's own template does the same: callers must flatten content parts to a string first.
    messages = [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]
    assert render(tokenizer, messages) == "<|im_start|>user\n<|im_end|>\n"


def test_rendered_prompt_tokenizes_with_single_special_tokens(tokenizer: TokenizerWrapper) -> None:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    vocab = tokenizer.get_vocab()
    assert ids[0] == vocab["<|im_start|>"] and ids.count(vocab["<|im_end|>"]) == 1


# --- the adapter dir ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "heads", "granularity"),
    [("tsw", 1, "token"), ("ssw", 1, "message_mean"), ("msw", 4, "token")],
)
def test_adapter_variants(
    tmp_path: Path, tiny_model_dir: Path, variant: str, heads: int, granularity: str
) -> None:
    path = write_tiny_adapter(tmp_path / variant, tiny_model_dir, variant=variant)
    raw = json.loads((path / CONFIG_FILE).read_text())
    assert raw["num_state_heads"] == heads and raw["memory_write_granularity"] == granularity
    assert raw["rank"] == 8 and raw["alpha"] == 16.0 and raw["delta_heads"] == ["q", "o"]
    adapter = load_adapter(path)
    dims = model_dims(json.loads((tiny_model_dir / "config.json").read_text()))
    validate_adapter(adapter, dims)
    shapes = expected_shapes(adapter.config, dims)
    assert set(adapter.tensors) == {tensor_key(i, name) for i in range(2) for name in shapes}
    assert "model.layers.1.self_attn.delta_k_proj" in adapter.tensors  # inactive, present on purpose
    assert not (path / PT_FILE).exists()


def test_adapter_recipe_statistics(tiny_adapter_dir: Path) -> None:
    tensors = load_adapter(tiny_adapter_dir).tensors
    matrices = np.concatenate([v.ravel() for k, v in tensors.items() if not k.endswith("_bias")])
    biases = np.concatenate([v.ravel() for k, v in tensors.items() if k.endswith("_bias")])
    assert abs(matrices.std() - 0.2) < 0.01 and abs(matrices.mean()) < 0.01
    assert biases.min() >= -2.0 and biases.max() <= 1.0 and biases.std() > 0.3


def test_adapter_pt_holds_the_same_tensors(tiny_adapter_dir: Path) -> None:
    from_npz = load_adapter(tiny_adapter_dir).tensors
    from_pt = read_torch_archive(tiny_adapter_dir / PT_FILE)
    assert sorted(from_pt) == sorted(from_npz)
    for key, value in from_npz.items():
        np.testing.assert_array_equal(from_pt[key], value)


def test_uncoupled_scalar_gate_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_tiny_adapter(
        tmp_path / "u",
        tiny_model_dir,
        couple_lambda=False,
        rankwise_gates=False,
        state_update_mode="lambda_outside",
        rank=4,
        write_npz=False,
        write_pt=True,
    )
    adapter = load_adapter(path)
    assert adapter.path.name == PT_FILE and not (path / NPZ_FILE).exists()
    assert adapter.config == DeltaMemConfig(
        rank=4, alpha=8.0, couple_lambda=False, rankwise_gates=False, state_update_mode="lambda_outside"
    )
    assert adapter.tensors["model.layers.0.self_attn.lambda_proj"].shape == (1, 64)
    assert adapter.tensors["model.layers.0.self_attn.beta_bias"].shape == (1,)
    validate_adapter(adapter, model_dims(json.loads((tiny_model_dir / "config.json").read_text())))


def test_bad_adapter_arguments_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        write_tiny_adapter(tmp_path / "x", tiny_model_dir, variant="big")
    with pytest.raises(ValueError, match="state_update_mode"):
        write_tiny_adapter(tmp_path / "y", tiny_model_dir, state_update_mode="sideways")


def test_generated_adapter_runs_on_the_runtime(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    ids = mx.array([tokenizer.encode("Remember: the cat is called Miso.")])
    plain = np.array(model(ids))
    attach_delta_mem(model, tiny_adapter_dir)
    cache = make_prompt_cache(model)
    delta = np.array(model(ids, cache=cache))
    # The first token reads a zero state, later ones read what earlier tokens wrote.
    np.testing.assert_allclose(delta[:, 0], plain[:, 0], atol=1e-5)
    assert np.abs(delta[:, 1:] - plain[:, 1:]).max() > 1e-2
    states = delta_states(model, cache)
    assert len(states) == 2 and states[0].shape == (1, 8, 8)


def test_a_real_vocabulary_model_tokenizes_openclaw_like_qwen3(tmp_path: Path, qwen_vocab_tokenizer: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "model", tokenizer_json=qwen_vocab_tokenizer, vocab_size=151936)
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 151936
    _, tokenizer = mlx_lm.load(str(model_dir))
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<tool_call>"]) == [151644, 151645, 151657]
    body = json.loads(OPENCLAW_TURNS.read_text(encoding="utf-8"))[0]["body"]
    messages = [
        ChatMessage(m["role"], m["content"] if isinstance(m["content"], str) else m["content"][0]["text"])
        for m in body["messages"]
    ]
    # OpenClaw 2026.9.6's first request: ≈ 12.3k tokens in Qwen3's vocabulary (12,280 with Qwen's template).
    assert 12_000 < len(render_prompt(tokenizer, messages, body["tools"])) < 12_500
