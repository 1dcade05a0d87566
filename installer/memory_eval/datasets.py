"""`--dataset builtin|locomo:PATH|mab:PATH` as a Dataset; files are only read, never fetched."""

from __future__ import annotations

from pathlib import Path

from installer.memory_eval.builtin_suite import SuiteSize, builtin_suite
from installer.memory_eval.conversations import Dataset, DatasetError
from installer.memory_eval.file_formats import DEFAULT_CHUNK_CHARS, load_locomo, load_memory_agent_bench


def load_dataset(spec: str, size: SuiteSize, seed: int, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Dataset:
    """The dataset a `--dataset` value names: the generated suite, a LoCoMo file or a MemoryAgentBench file."""
    kind, _, path = spec.partition(":")
    if kind == "builtin" and not path:
        return builtin_suite(size, seed)
    if kind == "locomo" and path:
        return load_locomo(Path(path).expanduser())
    if kind == "mab" and path:
        return load_memory_agent_bench(Path(path).expanduser(), chunk_chars)
    raise DatasetError(f"--dataset {spec!r}: use builtin, locomo:PATH or mab:PATH")
