"""Tiny Qwen-shaped mlx-lm models and δ-mem adapters, generated offline and deterministically.

Used by the tests and by `delta-mem-mlx selftest`: a model dir that `mlx_lm.load` accepts (random
weights, a small byte-level BPE tokenizer trained here, a ChatML template that renders tools, tool
calls and tool results the way Qwen3-Instruct-2507 does) and a random adapter dir for it.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
)

from common.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from sidecar.delta.adapter_files import (
    NPZ_FILE,
    PT_FILE,
    ModelDims,
    expected_shapes,
    model_dims,
)
from sidecar.delta.config import CONFIG_FILE, DeltaMemConfig, tensor_key
from sidecar.delta.torch_archive import write_torch_archive
from sidecar.testing.qwen_vocab import qwen_pre_tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's added tokens: ordinary (non-special) tokens, so decoding keeps them in the text.
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

_TRAINED_VOCAB_SIZE = 768
_DTYPES = ("float32", "bfloat16", "float16")
_VARIANTS = ("tsw", "ssw", "msw")

# ChatML exactly as Qwen3-Instruct-2507 renders it, written for this project. Deliberate
# choices: a `developer` message is treated as `system` (Qwen's own template drops it); content
# that is not a string renders as "" (as Qwen's does), so callers must flatten content parts;
# other unknown roles are skipped (as Qwen's does).
CHAT_TEMPLATE = """\
{%- set system_roles = ["system", "developer"] -%}
{%- set has_system = messages | length > 0 and messages[0].role in system_roles -%}
{%- if tools or has_system -%}
{{- "<|im_start|>system\\n" -}}
{%- if has_system and messages[0].content is string -%}
{{- messages[0].content -}}
{%- endif -%}
{%- if tools -%}
{%- if has_system -%}{{- "\\n\\n" -}}{%- endif -%}
{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" -}}
{{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" -}}
{%- for tool in tools -%}
{{- "\\n" + (tool | tojson) -}}
{%- endfor -%}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments " -}}
{{- "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n" -}}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>' -}}
{%- endif -%}
{{- "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
{%- set content = message.content if message.content is string else "" -%}
{%- if loop.first and has_system -%}
{%- elif message.role in system_roles -%}
{{- "<|im_start|>system\\n" + content + "<|im_end|>\\n" -}}
{%- elif message.role == "user" -%}
{{- "<|im_start|>user\\n" + content + "<|im_end|>\\n" -}}
{%- elif message.role == "assistant" -%}
{{- "<|im_start|>assistant\\n" + content -}}
{%- for tool_call in message.tool_calls or [] -%}
{%- if tool_call.function -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
{%- if content or not loop.first -%}{{- "\\n" -}}{%- endif -%}
{{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' -}}
{%- if tool_call.arguments is string -%}
{{- tool_call.arguments -}}
{%- else -%}
{{- tool_call.arguments | tojson -}}
{%- endif -%}
{{- "}\\n</tool_call>" -}}
{%- endfor -%}
{{- "<|im_end|>\\n" -}}
{%- elif message.role == "tool" -%}
{%- if loop.first or loop.previtem.role != "tool" -%}{{- "<|im_start|>user" -}}{%- endif -%}
{{- "\\n<tool_response>\\n" + content + "\\n</tool_response>" -}}
{%- if loop.last or loop.nextitem.role != "tool" -%}{{- "<|im_end|>\\n" -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""

_CORPUS = r"""
The memory of an assistant is not a diary. It is a small, quiet state that changes a little with
every word it reads, so that later questions find what earlier answers left behind.
Good morning! How are you today? I'm fine, thanks. We'll meet at the station at 9:30, won't we?
She said: "Don't forget the keys, the charger, and the umbrella." He laughed; it wasn't raining.
In 1969 people walked on the Moon. In 2024 a laptop could run a language model on its own.
A recipe for bread: 500 g flour, 350 ml water, 10 g salt, 5 g yeast. Mix, rest for 2 hours, bake.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Questions are easier when the answer is short: yes, no, maybe, later, never, always, sometimes.
Cats sleep for most of the day; dogs prefer a walk in the park and a stick to chase.
The user prefers tea over coffee, lives near the river, and has a sister called Maria.
Meeting notes: ship the release on Friday, fix the login bug first, then update the docs.
Tokyo, Paris, Berlin, Lagos, Lima and Sydney are cities; the Nile and the Amazon are rivers.
Café, naïve, façade, jalapeño, Zürich, smörgåsbord — 東京, 北京, 서울, Москва, Αθήνα, मुंबई. 🙂👍🎉
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 -7 +12 1e-6 50% $19.99 #3 @home
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search_notes", "description": "Search the notes",
 "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
{"role": "user", "content": "What did I say about the trip?"}, {"role": "assistant", "content": null}
{"id": "call_1", "ok": true, "count": 3, "items": [1, 2, 3], "nested": {"a": null, "b": false}}
[{"docid": "#39ae96", "score": 0.5, "file": "notes/pets.md", "line": 3, "title": "Pets"}]
def add(a: int, b: int) -> int:
    return a + b

class Counter:
    def __init__(self) -> None:
        self.value = 0

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print("odd", i)

import json, os, sys
data = json.loads(text)
result = {key: value for key, value in data.items() if value is not None}
const total = items.reduce((sum, item) => sum + item.price, 0);
function greet(name) { return `Hello, ${name}!`; }
if (x !== null && x.length > 0) { console.log(x[0]); } else { throw new Error("empty"); }
SELECT name, email FROM users WHERE active = 1 ORDER BY name LIMIT 20;
$ git commit -m "Fix the parser" && git push origin main
<html><body><p class="note">Hello &amp; welcome</p></body></html>
path/to/file.txt ~/Documents/report.pdf C:\Users\me\notes.md https://example.com/a?b=1&c=2
TODO: write tests. FIXME: handle the empty case. NOTE: keep the state in float32.
Once upon a time, in a village by the sea, there lived an old fisherman and his clever daughter.
Every evening they counted the boats, mended the nets, and told each other what the wind had said.
"Remember," said the old man, "the sea forgets nothing, but it only answers those who ask."
Science asks how; history asks when; poetry asks why; engineering asks how much and by Tuesday.
Please summarise the document in three bullet points, then list any open questions.
- first point
- second point
* a star item
1. step one
2. step two
Thank you! You're welcome. Sorry, I didn't catch that. Could you repeat the last part, please?
Tool result: the file was saved. Tool result: 3 matches found. Tool result: permission denied.
<tool_call>
{"name": "read_file", "arguments": {"path": "notes/today.md"}}
</tool_call>
<tool_response>
The meeting moved to Thursday at 14:00.
</tool_response>
"""


def write_tiny_model(
    dest: Path,
    *,
    model_type: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer_json: Path | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random Qwen3 (or Qwen2) model dir that `mlx_lm.load` accepts; returns `dest`.

    `tie_word_embeddings` writes no lm_head: the output projection is the embedding (as Qwen3-4B's).

    `tokenizer_json` replaces the tiny trained tokenizer with another (e.g. Qwen's real vocabulary,
    written by sidecar.testing.qwen_vocab, with `vocab_size` 151936), so that prompts tokenize
    as they do for the real model.
    """
    if model_type not in ("qwen3", "qwen2"):
        raise ValueError(f"model_type must be 'qwen3' or 'qwen2' (got {model_type!r})")
    if model_type == "qwen2" and head_dim * num_heads != hidden_size:
        raise ValueError("qwen2 derives head_dim from hidden_size / num_heads; pass a matching head_dim")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} (got {dtype!r})")
    dest = Path(dest)
    tokenizer = Tokenizer.from_file(str(tokenizer_json)) if tokenizer_json is not None else tiny_tokenizer()
    vocab_size = vocab_size or 64 * math.ceil(tokenizer.get_vocab_size() / 64)
    if vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()}")
    config = {
        "architectures": ["Qwen3ForCausalLM" if model_type == "qwen3" else "Qwen2ForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": model_type == "qwen2",
        "tie_word_embeddings": tie_word_embeddings,
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.token_to_id(PAD_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "torch_dtype": dtype,
    }
    if model_type == "qwen3":
        config["head_dim"] = head_dim
    weights = _random_weights(config, head_dim, np.random.default_rng(seed))
    if tie_word_embeddings:
        del weights["lm_head.weight"]  # drawn all the same: the other weights stay those of the untied model
    arrays = {key: mx.array(value).astype(getattr(mx, dtype)) for key, value in weights.items()}
    # MLX writes bfloat16 safetensors (numpy-based writers cannot); staging keeps the final write atomic.
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / "model.safetensors"
        mx.save_safetensors(str(staged), arrays, metadata={"format": "mlx"})
        atomic_write_bytes(dest / "model.safetensors", staged.read_bytes())
    atomic_write_json(dest / "config.json", config)
    atomic_write_text(dest / "tokenizer.json", tokenizer.to_str())
    atomic_write_json(dest / "tokenizer_config.json", _tokenizer_config())
    atomic_write_text(dest / "chat_template.jinja", CHAT_TEMPLATE)
    return dest


def write_tiny_adapter(
    dest: Path,
    model_dir: Path,
    *,
    variant: str = "tsw",
    rank: int = 8,
    seed: int = 1,
    state_update_mode: str = "standard",
    couple_lambda: bool = True,
    rankwise_gates: bool = True,
    write_npz: bool = True,
    write_pt: bool = False,
    target_layers: tuple[int, ...] = (),
) -> Path:
    """Write a random δ-mem adapter dir for the model in `model_dir` (δ on `target_layers`, all layers
    when empty); returns `dest`."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS} (got {variant!r})")
    dest = Path(dest)
    dims = model_dims(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))
    config = DeltaMemConfig(
        rank=rank,
        alpha=2.0 * rank,  # α/r = 2, the released recipe
        state_update_mode=state_update_mode,
        couple_lambda=couple_lambda,
        rankwise_gates=rankwise_gates,
        num_state_heads=4 if variant == "msw" else 1,
        memory_write_granularity="message_mean" if variant == "ssw" else "token",
        target_layers=target_layers,
    )
    config.check()
    tensors = random_adapter_tensors(config, dims, seed)
    atomic_write_json(dest / CONFIG_FILE, config.to_dict())
    if write_npz:
        buffer = io.BytesIO()
        np.savez(buffer, **tensors)
        atomic_write_bytes(dest / NPZ_FILE, buffer.getvalue())
    if write_pt:
        write_torch_archive(dest / PT_FILE, tensors)
    return dest


def random_adapter_tensors(config: DeltaMemConfig, dims: ModelDims, seed: int = 1) -> dict[str, np.ndarray]:
    """Random adapter tensors in the parity recipe: matrices N(0, 0.2²), gate biases U[-2, 1]."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    # Every tensor the format knows, including the inactive delta_k/delta_v (delta_heads is q, o),
    # so that tests can prove the runtime ignores them.
    for layer in range(dims.num_layers):
        for name, shape in expected_shapes(config, dims).items():
            if name.endswith("_bias"):
                value = rng.uniform(-2.0, 1.0, size=shape)
            else:
                value = rng.normal(0.0, 0.2, size=shape)
            tensors[tensor_key(layer, name)] = value.astype(np.float32)
    return tensors


@functools.cache
def _trained_tokenizer_json() -> str:
    return train_tokenizer(_CORPUS.splitlines(keepends=True), _TRAINED_VOCAB_SIZE).to_str()


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer like the tiny one (same special and added tokens), trained on `lines`.

    A larger vocabulary trained on text like the prompts a test sends makes those prompts far
    fewer tokens (OpenClaw's system prompt: ~32k tokens with the tiny tokenizer).
    """
    tokenizer = Tokenizer(models.BPE())
    # Qwen's split, so token boundaries behave like the real model's. No normaliser (the real one has
    # NFC): the byte-level round trip must be lossless for any Unicode input.
    tokenizer.pre_tokenizer = qwen_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in ADDED_TOKENS])
    return tokenizer


def tiny_tokenizer() -> Tokenizer:
    """The tiny byte-level BPE tokenizer (trained once per process on a built-in corpus)."""
    return Tokenizer.from_str(_trained_tokenizer_json())


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "split_special_tokens": False,
    }


def _random_weights(config: dict[str, Any], head_dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Embeddings N(0, 1), Linear weights N(0, 1/fan_in), norms 1 + 0.1·N(0, 1), biases 0.1·N(0, 1)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    linears: dict[str, tuple[int, int]] = {"lm_head.weight": (vocab, hidden)}
    norms: dict[str, int] = {"model.norm.weight": hidden}
    biases: dict[str, int] = {}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        linears |= {
            f"{layer}.self_attn.q_proj.weight": (q_out, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_out, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_out, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_out),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
        }
        norms |= {
            f"{layer}.input_layernorm.weight": hidden,
            f"{layer}.post_attention_layernorm.weight": hidden,
        }
        if config["model_type"] == "qwen3":
            norms |= {
                f"{layer}.self_attn.q_norm.weight": head_dim,
                f"{layer}.self_attn.k_norm.weight": head_dim,
            }
        else:
            biases |= {
                f"{layer}.self_attn.q_proj.bias": q_out,
                f"{layer}.self_attn.k_proj.bias": kv_out,
                f"{layer}.self_attn.v_proj.bias": kv_out,
            }
    weights = {"model.embed_tokens.weight": rng.normal(0.0, 1.0, size=(vocab, hidden))}
    for key, (out_dim, in_dim) in linears.items():
        weights[key] = rng.normal(0.0, 1.0 / math.sqrt(in_dim), size=(out_dim, in_dim))
    for key, size in norms.items():
        weights[key] = 1.0 + 0.1 * rng.normal(size=size)
    for key, size in biases.items():
        weights[key] = 0.1 * rng.normal(size=size)
    return {key: value.astype(np.float32) for key, value in weights.items()}
