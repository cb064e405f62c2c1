"""Scores of generated text against a reference, as fractions in [0, 1] (METHODS.md §6).

- ``exact-match``: 1 when the normalised prediction equals the normalised reference, SQuAD's
  normalisation (lower case, punctuation and the articles a/an/the removed, spaces collapsed).
- ``rouge-l``: ROUGE-L F1 from the ``rouge-score`` package (Lin 2004; longest common
  subsequence of tokens, Porter stemmer on), the scorer of Share's NLG code and SuperNI.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

__all__ = ["METRICS", "normalize_answer", "exact_match", "rouge_l", "score"]

METRICS = ("exact-match", "rouge-l")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score(metric: str, prediction: str, reference: str) -> float:
    """``metric`` (one of :data:`METRICS`) of one prediction.

    Raises:
        ValueError: for an unknown metric.
    """
    if metric == "exact-match":
        return exact_match(prediction, reference)
    if metric == "rouge-l":
        return rouge_l(prediction, reference)
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
