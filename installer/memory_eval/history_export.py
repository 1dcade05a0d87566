"""Each conversation's history as Markdown, to read what the model saw or to index it with QMD."""

from __future__ import annotations

from pathlib import Path

from common.files import atomic_write_text
from installer.memory_eval.conversations import Dataset

HISTORY_FILE = "conversation.md"


def write_histories(dataset: Dataset, out_dir: Path) -> Path:
    """Write `<out_dir>/history/<conversation id>/conversation.md` for every conversation; returns the folder."""
    folder = out_dir / "history"
    for conversation in dataset.conversations:
        lines = [f"# {conversation.id}", ""]
        lines += [f"**{message.role}**: {message.content}\n" for message in conversation.history]
        atomic_write_text(folder / conversation.id / HISTORY_FILE, "\n".join(lines))
    return folder
