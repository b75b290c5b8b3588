"""Scorers for generated text: each a named, registered function (generated, target) -> score in
[0, 1]. `exact_match` and `answer_first` are binary; `token_f1` is graded. All compare after the
usual QA normalisation (SQuAD's): lower case, punctuation and the articles a / an / the removed,
white space collapsed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable

from bench.core.errors import BenchError

Scorer = Callable[[str, str], float]
SCORERS: dict[str, Scorer] = {}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "–", "—", "…"}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn
    return deco


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise BenchError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@register_scorer("exact_match")
def exact_match(generated: str, target: str) -> float:
    """1 when the normalised generation is the normalised target."""
    return float(normalize_answer(generated) == normalize_answer(target))


@register_scorer("answer_first")
def answer_first(generated: str, target: str) -> float:
    """1 when the normalised generation starts with the normalised target, as whole words
    ("paris france" states "paris"; "parisian" does not)."""
    gen, tgt = normalize_answer(generated), normalize_answer(target)
    return float(bool(tgt) and (gen == tgt or gen.startswith(tgt + " ")))


@register_scorer("token_f1")
def token_f1(generated: str, target: str) -> float:
    """F1 of the normalised words of the generation against those of the target."""
    gen, tgt = normalize_answer(generated).split(), normalize_answer(target).split()
    common = sum((Counter(gen) & Counter(tgt)).values())
    if not gen or not tgt or common == 0:
        return float(gen == tgt)
    precision, recall = common / len(gen), common / len(tgt)
    return 2 * precision * recall / (precision + recall)
