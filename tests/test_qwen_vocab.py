"""Qwen's real vocabulary, built by sidecar.testing.qwen_vocab from a registry wheel, gives Qwen3's ids.

The expected ids were computed once with an independent build of the same rank file (and agree with
it on OpenClaw's whole captured requests and 300 random Unicode strings); they are written here so that
this test reads nothing outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from sidecar.testing import qwen_vocab
from sidecar.testing.qwen_vocab import QwenVocabError, rank_file

EXPECTED_IDS = {
    "The capital of France is Paris.": [785, 6722, 315, 9625, 374, 12095, 13],
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n": [
        750, 912, 2877, 25, 526, 11, 293, 25, 526, 8, 1464, 526, 510, 262, 470, 264, 488, 293, 220, 671, 2629, 198,
    ],
    "记住：猫叫米索。東京タワー": [105712, 5122, 100472, 99882, 72261, 50984, 1773, 102356, 46553, 46207, 125980],
    "Ship it 🚀🎉 👩\u200d💻": [29624, 432, 11162, 248, 222, 144841, 61804, 102, 378, 235, 145851],
    '<tool_call>\n{"name": "memory_search", "arguments": {"query": "cat"}}\n</tool_call>': [
        151657, 198, 4913, 606, 788, 330, 17269, 10716, 497, 330, 16370, 788, 5212, 1631, 788, 330, 4616, 95642,
        151658,
    ],
    "<|im_start|>user\nhi<|im_end|>\n": [151644, 872, 198, 6023, 151645, 198],
    # Decomposed accents: NFC first, as Qwen3's tokenizer does, so the same ids as "Café crème".
    "Cafe\u0301 cre\u0300me": [34, 2577, 963, 1560, 24267],
}  # fmt: skip


@pytest.fixture(scope="module")
def qwen(qwen_vocab_tokenizer: Path) -> Tokenizer:
    return Tokenizer.from_file(str(qwen_vocab_tokenizer))


@pytest.mark.parametrize("text", list(EXPECTED_IDS))
def test_texts_get_qwen3s_ids(qwen: Tokenizer, text: str) -> None:
    assert qwen.encode(text).ids == EXPECTED_IDS[text]


def test_the_vocabulary_ends_with_qwen3s_added_tokens(qwen: Tokenizer) -> None:
    assert qwen.get_vocab_size() == 151669 <= qwen_vocab.QWEN_VOCAB_SIZE
    added = qwen_vocab.SPECIAL_TOKENS + qwen_vocab.ORDINARY_ADDED_TOKENS
    assert [qwen.token_to_id(t) for t in added] == list(range(151643, 151669))
    assert qwen.token_to_id("<think>") == 151667
    # Special tokens are dropped when asked, the tool-call markers stay, and any text comes back whole.
    text = "<|im_start|>assistant\n<tool_call>\n记住 🚀</tool_call><|im_end|>"
    assert qwen.decode(qwen.encode(text).ids, skip_special_tokens=True) == "assistant\n<tool_call>\n记住 🚀</tool_call>"
    assert qwen.decode(qwen.encode(text).ids, skip_special_tokens=False) == text


def test_an_unreachable_registry_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No pip configuration (files or environment), no pip cache, and an index nobody listens on.
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    for name, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
                        "PIP_TIMEOUT": "2", "PIP_INDEX_URL": "http://127.0.0.1:9/simple/"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with pytest.raises(QwenVocabError, match="could not download dashscope==2.0.2 .*registry reachable"):
        rank_file(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half download left behind


def test_an_interpreter_without_pip_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv.create(tmp_path / "bare", with_pip=False)
    bare_python = tmp_path / "bare" / "bin" / "python"
    assert subprocess.run([bare_python, "-c", "import pip"], capture_output=True).returncode != 0
    monkeypatch.setattr(sys, "executable", str(bare_python))
    with pytest.raises(QwenVocabError, match="has no pip"):
        rank_file(tmp_path / "cache")


def test_a_wheel_without_the_expected_rank_file_is_refused(tmp_path: Path) -> None:
    missing, altered = tmp_path / "dashscope-0-py3-none-any.whl", tmp_path / "dashscope-1-py3-none-any.whl"
    with zipfile.ZipFile(missing, "w") as archive:
        archive.writestr("dashscope/__init__.py", "")
    with zipfile.ZipFile(altered, "w") as archive:
        archive.writestr(qwen_vocab.RANK_FILE_IN_WHEEL, "IQ== 0\n")
    with pytest.raises(QwenVocabError, match="holds no readable"):
        qwen_vocab._rank_file_from_wheel(missing)
    with pytest.raises(QwenVocabError, match="SHA-256"):
        qwen_vocab._rank_file_from_wheel(altered)
