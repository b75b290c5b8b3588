"""The docs of the offline `fact_retention` task: multiple choice over locality facts of the
editing tasks' eval splits (knowledge the edits must leave alone)."""

from __future__ import annotations

import math
import random

from bench.core.errors import BenchError
from tasks.registry import load_split

FACT_CHOICES = 4  # true answer + 3 distractors
FACT_MAX_DOCS = 1000  # docs written to fact_retention.jsonl (before --lm-limit)


def _tail(prompt: str) -> str:
    """The last two words of a prompt: locality probes of one relation share them
    ("... is a native speaker of", "... is located in")."""
    return " ".join(prompt.lower().split()[-2:])


def _locality_records(name: str, data_dir, exclude: set) -> list[tuple[str, str, str]]:
    try:
        split = load_split(name, "eval", data_dir)
    except BenchError:
        split = load_split(name, "eval", data_dir, holdout=True)  # holdout-only tasks
    out, seen = [], set()
    for case in split.cases:
        if (case.task, case.case_id) in exclude:
            continue
        for pa in case.locality:
            prompt, answer = pa.prompt.strip(), pa.answer.strip()
            key = (prompt, answer.lower())
            if prompt and answer and key not in seen:
                seen.add(key)
                out.append((case.case_id, prompt, answer))
    return out


def build_fact_retention_docs(data_dir, task_names: list[str], seed: int = 0,
                              n_choices: int = FACT_CHOICES, max_docs: int = FACT_MAX_DOCS,
                              exclude=()) -> list[dict]:
    """Multiple-choice docs from the locality probes of `task_names`' eval splits.

    One doc per distinct (prompt, answer) locality probe of a case not in `exclude` (pairs of
    (task, case_id): the cases being edited). The choices are the true answer and up to
    n_choices - 1 distractors: other locality answers of the same task, first from probes whose
    prompt ends in the same two words (same relation, e.g. "speaker of"), then from the whole
    task; distinct case-insensitively from each other and from the true answer. Probes per task
    are shuffled with random.Random("fact_retention:<seed>:<task>"), at most max_docs / #tasks
    are kept per task, and the union is shuffled again with the seed, so lm-eval's `limit`
    (the first N docs) is a seeded random sample.
    """
    exclude = set(exclude)
    per_task = max(1, math.ceil(max_docs / max(1, len(task_names))))
    docs: list[dict] = []
    for name in task_names:
        records = _locality_records(name, data_dir, exclude)
        groups: dict[str, list[str]] = {}
        pool: list[str] = []
        seen_pool: set[str] = set()
        group_seen: dict[str, set] = {}
        for _, prompt, answer in records:
            g = _tail(prompt)
            if answer.lower() not in group_seen.setdefault(g, set()):
                group_seen[g].add(answer.lower())
                groups.setdefault(g, []).append(answer)
            if answer.lower() not in seen_pool:
                seen_pool.add(answer.lower())
                pool.append(answer)
        rng = random.Random(f"fact_retention:{seed}:{name}")
        order = list(range(len(records)))
        rng.shuffle(order)
        kept = 0
        for i in order:
            if kept >= per_task:
                break
            case_id, prompt, answer = records[i]
            gold = answer.lower()
            want = n_choices - 1
            same = [a for a in groups[_tail(prompt)] if a.lower() != gold]
            picks = rng.sample(same, min(want, len(same)))
            taken = {a.lower() for a in picks} | {gold}
            others = len(pool) - len(taken)
            while len(picks) < want and others > 0:
                cand = pool[rng.randrange(len(pool))]
                if cand.lower() not in taken:
                    picks.append(cand)
                    taken.add(cand.lower())
                    others -= 1
            if not picks:
                continue  # a task whose probes all share one answer has no distractors
            choices = picks + [answer]
            rng.shuffle(choices)
            docs.append({"id": f"{name}/{case_id}/{kept}", "task": name, "case_id": case_id,
                         "query": prompt, "choices": choices, "gold": choices.index(answer)})
            kept += 1
    random.Random(f"fact_retention:{seed}").shuffle(docs)
    return docs
