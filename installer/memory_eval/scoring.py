"""Answer scores (exact match, token F1, key-term recall) and bootstrap intervals of their means."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from installer.memory_eval.text import content_words, normalize, words

METRICS = ("exact_match", "token_f1", "key_term_recall")


@dataclass(frozen=True)
class Interval:
    """A mean (of paired differences, for a comparison) and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    said = normalize(prediction)
    return float(any(said == normalize(answer) for answer in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best word-overlap F1 between the prediction and any gold answer."""
    return max((_f1(words(prediction), words(answer)) for answer in answers), default=0.0)


def key_term_recall(prediction: str, terms: Sequence[str]) -> float:
    """The fraction of key terms (words or phrases) that appear in the prediction."""
    if not terms:
        return 0.0
    said = f" {normalize(prediction)} "
    found = sum(1 for term in terms if (phrase := normalize(term)) and f" {phrase} " in said)
    return found / len(terms)


def answer_terms(answer: str) -> list[str]:
    """Key terms taken from a gold answer: its content words (all words if it has none)."""
    return content_words(answer) or words(answer)


def score_answer(prediction: str, answers: Sequence[str], key_terms: Sequence[str] = ()) -> dict[str, float]:
    """All three scores for one answer; without key terms, the gold answers' words are the terms."""
    if key_terms:
        recall = key_term_recall(prediction, key_terms)
    else:
        recall = max((key_term_recall(prediction, answer_terms(a)) for a in answers), default=0.0)
    return {
        "exact_match": exact_match(prediction, answers),
        "token_f1": token_f1(prediction, answers),
        "key_term_recall": recall,
    }


def bootstrap_mean(values: Sequence[float], seed: int, resamples: int = 2000, confidence: float = 0.95) -> Interval:
    """Mean of `values`, with a percentile bootstrap interval."""
    if not values:
        raise ValueError("a bootstrap needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    low = means[int(tail * (resamples - 1))]
    high = means[round((1.0 - tail) * (resamples - 1))]
    return Interval(sum(values) / n, low, high)


def bootstrap_difference(
    scores: Sequence[float],
    baseline: Sequence[float],
    seed: int,
    resamples: int = 2000,
    confidence: float = 0.95,
) -> Interval:
    """Mean of `scores − baseline` over paired items, with a percentile bootstrap interval."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("a paired bootstrap needs two non-empty score lists of the same length")
    return bootstrap_mean([a - b for a, b in zip(scores, baseline, strict=True)], seed, resamples, confidence)


def _f1(predicted: list[str], gold: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)
