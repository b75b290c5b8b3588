"""InstructEdit-style instruction wrapping.

A wrapped prompt reads (default template):

    Task: <card.instructions.task>
    Description: <one of the card's descriptions>
    Input: <the original prompt>

Seen descriptions are the ones an instruction-following editor may train on; unseen ones are
kept for testing whether it generalises to new phrasings. Locality prompts are never wrapped:
they probe knowledge the edit must leave alone, so they stay exactly as the data gives them.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import lru_cache

from jinja2 import Environment, StrictUndefined, Template

from bench.core.cases import EditCase, PromptAnswer
from bench.core.errors import BenchError
from tasks.card import TaskCard
from tasks.registry import get_card

MODES = ("seen", "unseen")


@lru_cache(maxsize=None)
def _template(source: str) -> Template:
    env = Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    return env.from_string(source)


def wrap_prompt(card: TaskCard, description: str, text: str) -> str:
    """`text` inside the card's instruction template."""
    return _template(card.instructions.template).render(
        task=card.instructions.task, description=description, input=text)


def pick_description(card: TaskCard, mode: str, key: str, seed: int) -> str:
    """A description from the seen or unseen pool, fixed by (key, seed) across runs and machines."""
    if mode not in MODES:
        raise BenchError(f"unknown instruction mode {mode!r}; use one of: {', '.join(MODES)}")
    pool = card.instructions.pool(mode == "seen")
    digest = hashlib.sha256(f"{seed}:{card.name}:{key}".encode("utf-8")).hexdigest()
    return pool[int(digest, 16) % len(pool)]


def wrap_case(case: EditCase, card: TaskCard, description: str) -> EditCase:
    """The case with prompt, rephrase and portability prompts wrapped; locality untouched."""
    wrap = lambda text: wrap_prompt(card, description, text)  # noqa: E731
    wrapped = replace(
        case,
        prompt=wrap(case.prompt),
        rephrase_prompts=tuple(wrap(p) for p in case.rephrase_prompts),
        portability=tuple(PromptAnswer(wrap(p.prompt), p.answer) for p in case.portability),
        instruction=description,
    )
    if case.subject not in wrapped.prompt:  # only possible with a card template that drops {{ input }}
        raise BenchError(f"task {card.name!r}: instruction template lost the subject of case {case.case_id}")
    return wrapped


def instruct(case: EditCase, mode: str, seed: int) -> EditCase:
    """`case` wrapped in its task's instruction with a `mode` ("seen" or "unseen") description
    fixed by (case id, seed): the one wrapper that training and evaluation share."""
    card = get_card(case.task)
    return wrap_case(case, card, pick_description(card, mode, key=case.case_id, seed=seed))
