"""Answer normalisation and word splitting shared by the scorer and the lexical retriever."""

from __future__ import annotations

import re
import string
import unicodedata

ARTICLES = frozenset({"a", "an", "the"})

# Words that carry no answer on their own, dropped from gold answers used as key terms and from
# retrieval queries ("may" and "will" stay: a month, a name).
_STOPWORD_TEXT = """
a an the and or but if of to in on at by for with from as is are was were be been being am do does
did have has had i me my mine we our you your yours he him his she her it its they them their this
that these those what which who whom whose when where why how there here not no so than then too
very can could would shall should might must just also about into over after before
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}\u2018\u201c\u201d\u2013\u2014\u2026]")


def normalize(text: str) -> str:
    """Lower-case, without punctuation and articles, single spaces (SQuAD-style)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text))
    return " ".join(word for word in text.split() if word not in ARTICLES)


def words(text: str) -> list[str]:
    """The normalised words of a text."""
    return normalize(text).split()


def content_words(text: str) -> list[str]:
    """The normalised words of a text without stopwords."""
    return [word for word in words(text) if word not in STOPWORDS]


def search_terms(text: str) -> list[str]:
    """Content words with a plural or third-person 's' cut off, so 'lives' finds 'live'."""
    return [word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word
            for word in content_words(text)]
