"""Qwen2/Qwen3's real vocabulary as a `tokenizers` tokenizer.json, built from a package-registry wheel.

The `dashscope` 2.0.2 wheel on PyPI ships Qwen's byte-level BPE ranks (`dashscope/resources/qwen.tiktoken`:
one token per line, its bytes in base64 and its rank, 151,643 lines). They are fetched with pip, never
from a model hub, checked against a pinned SHA-256, and turned into what the real Qwen3 tokenizer.json
holds: the vocabulary (id = rank), the merges the ranks imply, NFC normalisation, Qwen's pre-tokenizer
split, and Qwen3's 26 added tokens at ids 151643-151668. A model using it declares `vocab_size`
QWEN_VOCAB_SIZE (the embedding rows are padded past the last added token).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from common.files import atomic_write_bytes, atomic_write_text

QWEN_VOCAB_SIZE = 151936
RANK_COUNT = 151643
WHEEL_REQUIREMENT = "dashscope==2.0.2"
RANK_FILE_IN_WHEEL = "dashscope/resources/qwen.tiktoken"
RANK_FILE_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
RANK_FILE = "qwen.tiktoken"
# Bumped whenever the build below changes, so that a cache never hands out an older build.
BUILD_DIR = "build-1"
PIP_TIMEOUT_S = 900.0
_MAX_RANK_FILE_BYTES = 16 * 1024 * 1024

# Qwen2/Qwen3's pre-tokenizer split (contractions, letters, single digits, punctuation runs,
# newlines, spaces).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens in id order from RANK_COUNT on. The special ones are dropped when decoding with
# skip_special_tokens; the others (tool calls, thinking, fill-in-the-middle) stay in the text.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
ORDINARY_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip


class QwenVocabError(RuntimeError):
    """Qwen's rank file could not be fetched, or is not the one expected."""


def write_qwen_tokenizer(out_dir: Path, cache_dir: Path) -> Path:
    """Write `out_dir/tokenizer.json` with Qwen3's real vocabulary and return its path.

    The rank file is taken from `cache_dir`, fetched there first (pip, from the package registry)
    when missing. Raises QwenVocabError when pip cannot fetch it or it is not the expected file.
    """
    tokenizer = qwen_tokenizer(read_ranks(rank_file(cache_dir)))
    target = Path(out_dir) / "tokenizer.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, tokenizer.to_str())
    return target


def cached_qwen_tokenizer(cache_dir: Path) -> Path:
    """The tokenizer.json built in `cache_dir` by write_qwen_tokenizer, building it on first use."""
    built = Path(cache_dir) / BUILD_DIR / "tokenizer.json"
    if built.is_file():
        return built
    return write_qwen_tokenizer(built.parent, cache_dir)


def rank_file(cache_dir: Path) -> Path:
    """`cache_dir/qwen.tiktoken`, extracted from the dashscope wheel (downloaded with pip) unless present."""
    cache_dir = Path(cache_dir)
    target = cache_dir / RANK_FILE
    if target.is_file() and _sha256(target.read_bytes()) == RANK_FILE_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A folder of its own per download: two test runs sharing the cache never see each other's halves.
    download = Path(tempfile.mkdtemp(prefix="wheel-", dir=cache_dir))
    try:
        data = _rank_file_from_wheel(_download_wheel(download))
    finally:
        shutil.rmtree(download, ignore_errors=True)
    atomic_write_bytes(target, data)
    return target


def read_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes → rank, from a tiktoken rank file; raises QwenVocabError unless ranks are 0..RANK_COUNT-1."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    if sorted(ranks.values()) != list(range(RANK_COUNT)):
        raise QwenVocabError(f"{path} does not hold ranks 0..{RANK_COUNT - 1} once each")
    return ranks


def qwen_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """The byte-level BPE tokenizer Qwen3 uses, on these ranks, with Qwen3's added tokens after them."""
    symbols = _byte_symbols()

    def spelled(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = [(spelled(left), spelled(right)) for left, right in (_last_merge(t, ranks) for t in by_rank[256:])]
    tokenizer = Tokenizer(models.BPE(vocab={spelled(t): ranks[t] for t in by_rank}, merges=merges))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = qwen_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens match the raw text (normalized=False), as in Qwen3's own tokenizer.json.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ORDINARY_ADDED_TOKENS])
    for offset, token in enumerate(SPECIAL_TOKENS + ORDINARY_ADDED_TOKENS):
        if tokenizer.token_to_id(token) != len(ranks) + offset:
            raise QwenVocabError(f"{token} got id {tokenizer.token_to_id(token)}, not {len(ranks) + offset}")
    return tokenizer


def qwen_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2/Qwen3's pre-tokenizer: its split of the text, then each piece's bytes as byte-level symbols."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: BPE on its bytes, with only the ranks below its own, stops at two parts."""
    own = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        candidates = [(ranks.get(parts[i] + parts[i + 1], own), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates)
        if rank >= own:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise QwenVocabError(f"rank {own} ({token!r}) cannot be reached by merging lower ranks")
    return parts[0], parts[1]


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte in a byte-level BPE vocabulary (GPT-2's mapping)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _download_wheel(folder: Path) -> Path:
    """Fetch the dashscope wheel (no dependencies) into `folder` with this interpreter's pip."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(folder), WHEEL_REQUIREMENT,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise QwenVocabError(f"pip download {WHEEL_REQUIREMENT} took over {PIP_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        if "No module named pip" in output:
            raise QwenVocabError(f"{sys.executable} has no pip to fetch {WHEEL_REQUIREMENT}: {output[-300:]}")
        raise QwenVocabError(
            f"pip could not download {WHEEL_REQUIREMENT} (is the package registry reachable?): {output[-500:]}"
        )
    wheels = sorted(folder.glob("dashscope-*.whl"))
    if len(wheels) != 1:
        raise QwenVocabError(f"pip download {WHEEL_REQUIREMENT} left {[w.name for w in wheels]}, not one wheel")
    return wheels[0]


def _rank_file_from_wheel(wheel: Path) -> bytes:
    """The rank file's bytes from the wheel, checked against RANK_FILE_SHA256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if archive.getinfo(RANK_FILE_IN_WHEEL).file_size > _MAX_RANK_FILE_BYTES:
                raise QwenVocabError(f"{RANK_FILE_IN_WHEEL} in {wheel.name} is too large to be Qwen's rank file")
            data = archive.read(RANK_FILE_IN_WHEEL)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise QwenVocabError(f"{wheel.name} holds no readable {RANK_FILE_IN_WHEEL}: {exc}") from exc
    if _sha256(data) != RANK_FILE_SHA256:
        raise QwenVocabError(f"{RANK_FILE_IN_WHEEL} in {wheel.name} is not the expected file (SHA-256 differs)")
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
