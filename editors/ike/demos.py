"""IKE's demonstrations: what each train case can teach, and which ones an edit gets.

A train case (prompt p, its new target t, rephrases, locality prompts) gives up to three
demonstrations, each a "New Fact" followed by a "Prompt" with its expected continuation:

    copy     New Fact: p t\\nPrompt: p t\\n\\n              (say the new fact back)
    update   New Fact: p t\\nPrompt: r t\\n\\n              (r: one of its rephrases)
    retain   New Fact: p t\\nPrompt: l a\\n\\n              (l, a: one of its locality probes)

The rephrase / locality probe a case shows is picked once, seeded by (seed, case id, type), so a
case always gives the same demonstration. Similarity is measured between query texts
"New Fact: p t\\nPrompt: p" (EasyEdit's query): the new fact's against each train case's
("proportional") or against each demonstration's own text ("retrieved").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from bench.core.cases import EditCase
from editors.ike.retrievers import Retriever

TYPES = ("copy", "update", "retain")


@dataclass(frozen=True)
class Demo:
    case_id: str
    type: str
    score: float
    text: str


def fact(case: EditCase) -> str:
    return f"{case.prompt} {case.target_new}"


def query_text(case: EditCase) -> str:
    return f"New Fact: {fact(case)}\nPrompt: {case.prompt}"


def question_key(prompt: str) -> str:
    """What makes two prompts the same question (case and spacing aside)."""
    return " ".join(prompt.casefold().split())


def _pick(items: list, seed: int, case_id: str, kind: str):
    return random.Random(f"{seed}:{case_id}:{kind}").choice(items)


def demo_text(case: EditCase, kind: str, seed: int) -> str | None:
    """The demonstration of type `kind` this train case gives; None if it has no material for it."""
    head = f"New Fact: {fact(case)}\nPrompt: "
    if kind == "copy":
        return f"{head}{fact(case)}\n\n"
    if kind == "update":
        if not case.rephrase_prompts:
            return None
        return f"{head}{_pick(list(case.rephrase_prompts), seed, case.case_id, kind)} {case.target_new}\n\n"
    if not case.locality:
        return None
    probe = _pick(list(case.locality), seed, case.case_id, kind)
    return f"{head}{probe.prompt} {probe.answer}\n\n"


def quotas(k: int, ratios: dict[str, float]) -> dict[str, int]:
    """k split in the proportions `ratios` (largest remainder; ties in TYPES order)."""
    total = sum(ratios.values())
    if k == 0 or total <= 0:
        return {t: 0 for t in ratios}
    raw = {t: k * r / total for t, r in ratios.items()}
    out = {t: int(np.floor(v)) for t, v in raw.items()}
    rest = sorted(ratios, key=lambda t: (-(raw[t] - out[t]), TYPES.index(t)))
    for t in rest[:k - sum(out.values())]:
        out[t] += 1
    return out


class DemoPool:
    """One task's train split as demonstrations, indexed by a retriever. `selection`:
    "proportional" indexes the cases (their query texts), "retrieved" every demonstration."""

    def __init__(self, cases: list[EditCase], retriever: Retriever, selection: str, seed: int,
                 model, tokenizer):
        self.cases = list(cases)
        self.selection = selection
        self.seed = seed
        self.retriever = retriever
        self.questions = [question_key(c.prompt) for c in self.cases]
        texts = {(i, kind): demo_text(c, kind, seed) for i, c in enumerate(self.cases) for kind in TYPES}
        self.texts = {key: t for key, t in texts.items() if t is not None}
        self.available = tuple(kind for kind in TYPES if any(key[1] == kind for key in self.texts))
        if selection == "proportional":
            self.keys = [(i, None) for i in range(len(self.cases))]
            indexed = [query_text(c) for c in self.cases]
        else:
            self.keys = sorted(self.texts)
            indexed = [self.texts[key].rstrip("\n") for key in self.keys]
        if indexed:
            retriever.fit(indexed, model, tokenizer)

    def _ranked(self, query: EditCase, excluded: set[str],
                excluded_ids: set[str]) -> tuple[list[int], np.ndarray]:
        """Indices into self.keys, most similar first, without the excluded cases (by case id,
        or by question: `excluded` holds question_key of prompts); the scores."""
        if not self.keys:
            return [], np.zeros(0)
        scores = self.retriever.scores(query_text(query))
        order = np.argsort(-scores, kind="stable")
        ok = [(c.case_id not in excluded_ids and q not in excluded) for c, q in zip(self.cases, self.questions)]
        return [int(j) for j in order if ok[self.keys[j][0]]], scores

    def select(self, query: EditCase, k: int, ratios: dict[str, float], rng: random.Random,
               excluded: set[str], excluded_ids: set[str]) -> list[Demo]:
        """The k demonstrations for `query`, most similar first, none of an excluded case."""
        ranked, scores = self._ranked(query, excluded, excluded_ids)
        if self.selection == "retrieved":
            return [self._demo(j, self.keys[j][1], scores) for j in ranked[:k]]
        share = quotas(k, {t: (r if t in self.available else 0.0) for t, r in ratios.items()})
        slots = [t for t in TYPES for _ in range(share[t])]
        rng.shuffle(slots)
        used: set[int] = set()
        cursor = {t: 0 for t in TYPES}
        picked: list[Demo] = []
        for kind in slots:  # each slot takes the most similar unused case that can give its type
            while cursor[kind] < len(ranked):
                j = ranked[cursor[kind]]
                cursor[kind] += 1
                if j not in used and (j, kind) in self.texts:
                    used.add(j)
                    picked.append(self._demo(j, kind, scores))
                    break
        return sorted(picked, key=lambda d: -d.score)

    def _demo(self, j: int, kind: str, scores: np.ndarray) -> Demo:
        i = self.keys[j][0]
        return Demo(self.cases[i].case_id, kind, round(float(scores[j]), 6), self.texts[(i, kind)])


def arrange(demos: list[Demo], order: str, rng: random.Random) -> list[Demo]:
    """Demonstrations (most similar first) in the order they go into the context."""
    if order == "similar_first":
        return list(demos)
    if order == "similar_last":
        return list(reversed(demos))
    out = list(demos)
    rng.shuffle(out)
    return out
