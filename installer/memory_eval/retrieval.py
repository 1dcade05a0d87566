"""Memory snippets for a question: BM25 over the conversation's own history, or QMD when asked.

Both memory modes get the same snippets for the same question; only how they reach the model
differs (hidden `attention_state` or pasted into the prompt).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from common.settings import QmdSettings
from installer.memory_eval.conversations import Conversation
from installer.memory_eval.text import search_terms

# Okapi BM25's usual constants.
BM25_K1 = 1.2
BM25_B = 0.75


@dataclass(frozen=True)
class Snippet:
    """One retrieved piece of memory."""

    text: str
    source: str
    score: float


@dataclass(frozen=True)
class Retrieved:
    """What a lookup found, and why it found nothing when it failed."""

    snippets: tuple[Snippet, ...]
    problem: str | None = None


class Retriever(Protocol):
    """Finds memory snippets for a question within one conversation."""

    def search(self, query: str, k: int) -> Retrieved:
        """The best `k` snippets for `query`."""
        ...


class LexicalRetriever:
    """Okapi BM25 over one conversation's history messages (each message is a document)."""

    def __init__(self, conversation: Conversation):
        self._texts = [message.content for message in conversation.history]
        self._sources = [f"{conversation.id}#{i}" for i in range(len(self._texts))]
        self._docs = [Counter(search_terms(text)) for text in self._texts]
        self._lengths = [sum(doc.values()) for doc in self._docs]
        self._average = (sum(self._lengths) / len(self._lengths)) if self._lengths else 0.0
        frequency: Counter[str] = Counter()
        for doc in self._docs:
            frequency.update(doc.keys())
        n = len(self._docs)
        self._idf = {word: math.log(1 + (n - f + 0.5) / (f + 0.5)) for word, f in frequency.items()}

    def search(self, query: str, k: int) -> Retrieved:
        """The `k` best-scoring distinct messages; ties go to the earlier message, zero scores are left out."""
        terms = set(search_terms(query))
        scored = [(self._score(i, terms), i) for i in range(len(self._docs))]
        ranked = sorted((pair for pair in scored if pair[0] > 0), key=lambda pair: (-pair[0], pair[1]))
        snippets = (Snippet(self._texts[i], self._sources[i], round(score, 4)) for score, i in ranked)
        return Retrieved(_distinct(snippets, k))

    def _score(self, index: int, terms: set[str]) -> float:
        doc, length = self._docs[index], self._lengths[index]
        total = 0.0
        for term in terms:
            tf = doc.get(term, 0)
            if tf:
                norm = tf + BM25_K1 * (1 - BM25_B + BM25_B * length / self._average)
                total += self._idf[term] * tf * (BM25_K1 + 1) / norm
        return total


class QmdRetriever:
    """Asks QMD (as the sidecar would) within a collection; `{conversation}` in its name is replaced."""

    def __init__(self, settings: QmdSettings, conversation: Conversation):
        collection = settings.collection.replace("{conversation}", conversation.id) if settings.collection else None
        self._settings = replace(settings, collection=collection)

    def search(self, query: str, k: int) -> Retrieved:
        """QMD's best `k` hits; a QMD failure gives no snippets and the reason."""
        # Imported here: only QMD lookups need asyncio and the sidecar's memory input (pydantic), not --help.
        import asyncio

        from sidecar.server.qmd import qmd_lookup

        result = asyncio.run(qmd_lookup(replace(self._settings, limit=k), query))
        found = (Snippet(item.text, item.source or "qmd", item.score or 0.0) for item in result.snippets)
        snippets = _distinct(found, k)
        return Retrieved(snippets, None if snippets else result.reason)


def _distinct(snippets: Iterable[Snippet], k: int) -> tuple[Snippet, ...]:
    # The sidecar drops repeated snippet texts, and a repeat tells the model nothing new either.
    seen: dict[str, Snippet] = {}
    for snippet in snippets:
        seen.setdefault(snippet.text, snippet)
        if len(seen) == k:
            break
    return tuple(seen.values())
