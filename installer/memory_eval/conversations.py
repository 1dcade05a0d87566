"""The shape every evaluation set takes: conversations with a history and questions asked after it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import UserError
from installer.sidecar_client import Message


class DatasetError(UserError, ValueError):
    """A dataset that cannot be built or read; the message names the file and what is wrong."""

    topic = "dataset"


@dataclass(frozen=True)
class Question:
    """A question asked after the history, with its gold answers."""

    id: str
    text: str
    answers: tuple[str, ...]
    kind: str
    key_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """One conversation: the system prompt, the history replayed turn by turn, then the questions."""

    id: str
    system: str
    history: tuple[Message, ...]
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Dataset:
    """Conversations to evaluate, where they came from and how they were made."""

    name: str
    conversations: tuple[Conversation, ...]
    source: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    skipped_questions: int = 0

    def limited(self, conversations: int | None, questions: int | None) -> Dataset:
        """The first `conversations` conversations, each with its first `questions` questions."""
        if conversations is not None and conversations < 1:
            raise DatasetError("--limit must be at least 1")
        if questions is not None and questions < 1:
            raise DatasetError("--max-questions must be at least 1")
        kept = self.conversations[:conversations] if conversations is not None else self.conversations
        if questions is not None:
            kept = tuple(replace(c, questions=c.questions[:questions]) for c in kept)
        return replace(self, conversations=kept)

    @property
    def question_count(self) -> int:
        """How many questions the dataset asks in all."""
        return sum(len(c.questions) for c in self.conversations)


def safe_id(text: str) -> str:
    """An id usable as a folder name and a session-key part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "conversation"
