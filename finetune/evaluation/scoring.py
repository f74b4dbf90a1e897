"""Text and label scores for the evaluate stage: ROUGE-L and token F1 against a reference, accuracy and macro-F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation or English articles, as SQuAD's token F1 compares them.

    `words("The bond's yield: 4.5%!")` -> `['bonds', 'yield', '45']`.
    """
    return ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall, counting repeats (SQuAD's F1); 1.0 when both are empty."""
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1) on the same words as `token_f1`; 1.0 when both are empty."""
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)


def macro_f1(predicted: Sequence[str], expected: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean over the fixed `labels` of each label's F1, 2·hits / (times predicted + times expected).

    A label neither predicted nor expected scores 0, as scikit-learn's `f1_score(..., labels=labels,
    average="macro", zero_division=0)` does.
    """
    scores = []
    for label in labels:
        hits = sum(p == e == label for p, e in zip(predicted, expected, strict=True))
        said, truth = sum(p == label for p in predicted), sum(e == label for e in expected)
        scores.append(2 * hits / (said + truth) if said + truth else 0.0)
    return sum(scores) / len(scores)
