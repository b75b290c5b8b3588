"""Evaluation in the wild ("The Mirage of Model Editing", Yang et al., ACL 2025): every probe of a
case is answered by the model itself, greedy from the prompt alone, stopped naturally
(bench.core.generation), and judged as a QA system would be.

Per case and state (pre- or post-edit), scores in [0, 1]:

* wild_reliability / wild_generality / wild_portability - the fraction of the edit prompt /
  rephrases / portability prompts whose generated answer the primary scorer judges correct
  against target_new (portability: against its own answer); binary per probe for exact_match,
  answer_first and the judge;
* wild_locality - the fraction of locality prompts whose generated answer the edit left unchanged
  (normalised text equal before and after the edit; 1 before the edit by definition);
* wild_locality_correct - the fraction of locality prompts answered correctly (their ground truth);
* fluency (only when asked for) - ROME's weighted bi- and tri-gram entropy of longer generations
  from the edit and rephrase prompts.

Every scorer's verdict on every probe is kept in the case record, with the generated texts and
stop reasons, so a reader can rescore or audit.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.generation import Generation, StopRules, generate, regenerate
from bench.core.judge import JudgeItem, Verdict
from bench.core.prompts import format_prompt
from bench.core.scorers import SCORERS, get_scorer, normalize_answer

CAP_MARGIN = 8  # tokens beyond the task's longest gold answer in the default max_new_tokens
# Rows decoded together: a decoding step reads every weight for one token per row, so on a CPU
# a step of 128 rows costs about twice one of 32 (SmolLM2, docs/speed.md), a quarter per row.
DECODE_BATCH = 128
FLUENCY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # ROME's n-gram weights


@dataclass(frozen=True)
class WildProbe:
    slot: str  # "prompt", "rephrase", "locality" or "portability"
    prompt: str
    answer: str  # what a correct answer states


@dataclass
class WildSettings:
    rules: StopRules
    scorer: str = "answer_first"  # the primary scorer: the wild_* metrics are its verdicts
    prompt_format: str = "plain"
    judge: object | None = None  # a bench.core.judge judge; adds the "judge" verdict
    fluency_tokens: int = 0  # > 0: also generate this many tokens for fluency
    decode_batch: int = DECODE_BATCH  # rows decoded together (decoding reads every weight per step)
    # a bench.core.answer_cache.AnswerCache: the unedited model's answers kept across runs (None: off)
    answers: object | None = None
    _verdicts: dict = field(default_factory=dict, repr=False)  # judge verdicts memo

    def __post_init__(self) -> None:
        if self.scorer != "judge":
            get_scorer(self.scorer)
        elif self.judge is None:
            raise BenchError("the judge scorer needs --judge MODEL or --judge-url URL")


def wild_probes(case: EditCase) -> list[WildProbe]:
    probes = [WildProbe("prompt", case.prompt, case.target_new)]
    probes += [WildProbe("rephrase", p, case.target_new) for p in case.rephrase_prompts]
    probes += [WildProbe("locality", pa.prompt, pa.answer) for pa in case.locality]
    probes += [WildProbe("portability", pa.prompt, pa.answer) for pa in case.portability]
    return probes


def probe_prompts(tokenizer, case: EditCase, settings: WildSettings) -> list[str]:
    """The prompts the model is given for a case's wild probes (in `wild_probes` order)."""
    return [format_prompt(tokenizer, p.prompt, settings.prompt_format) for p in wild_probes(case)]


def default_max_new_tokens(tokenizer, cases: list[EditCase], margin: int = CAP_MARGIN) -> int:
    """The longest gold answer of `cases` in tokens (tokenised as a continuation, after a space),
    plus `margin`: no gold answer can be cut by the cap."""
    answers = sorted({p.answer for case in cases for p in wild_probes(case)})
    lengths = tokenizer([" " + a.strip() for a in answers], add_special_tokens=False)["input_ids"]
    return max((len(ids) for ids in lengths), default=1) + margin


def generate_cases(model, tokenizer, cases: list[EditCase], settings: WildSettings,
                   batch_size: int = 32, earlier: list[list[Generation]] | None = None,
                   share_prefix: bool = False, on_rows: Callable[[list[int]], None] | None = None
                   ) -> list[list[Generation]]:
    """The generations of every probe of every case (one batched call), per case. With the
    `earlier` generations of the same cases (before the edit), only the probes whose earlier
    answer the model no longer gives are decoded again (bench.core.generation.regenerate).
    `on_rows`: told which cases (indices) the rows of each forward pass belong to."""
    probes = [probe_prompts(tokenizer, case, settings) for case in cases]
    prompts = [p for ps in probes for p in ps]
    tell = _per_case(probes, on_rows)
    if earlier is None:
        gens = generate(model, tokenizer, prompts, settings.rules, batch_size, share_prefix, tell)
    else:
        gens = regenerate(model, tokenizer, prompts, [g for gs in earlier for g in gs], settings.rules,
                          batch_size, share_prefix, tell)
    out, at = [], 0
    for ps in probes:
        out.append(gens[at: at + len(ps)])
        at += len(ps)
    return out


def fluency_texts(model, tokenizer, cases: list[EditCase], settings: WildSettings,
                  batch_size: int = 32, earlier: list[list[Generation]] | None = None,
                  share_prefix: bool = False, on_rows: Callable[[list[int]], None] | None = None
                  ) -> list[list[Generation]]:
    """Longer generations (settings.fluency_tokens, no natural stop) from each case's edit and
    rephrase prompts, per case (`earlier`, `on_rows`: as for generate_cases)."""
    prompts = [[case.prompt, *case.rephrase_prompts] for case in cases]
    flat = [format_prompt(tokenizer, p, settings.prompt_format) for ps in prompts for p in ps]
    rules = StopRules(max_new_tokens=settings.fluency_tokens, at_newline=False)
    tell = _per_case(prompts, on_rows)
    if earlier is None:
        gens = generate(model, tokenizer, flat, rules, batch_size, share_prefix, tell)
    else:
        gens = regenerate(model, tokenizer, flat, [g for gs in earlier for g in gs], rules, batch_size,
                          share_prefix, tell)
    out, at = [], 0
    for ps in prompts:
        out.append(gens[at: at + len(ps)])
        at += len(ps)
    return out


def _per_case(per_case: list[list], on_rows: Callable[[list[int]], None] | None):
    """`on_rows` told cases where it is given prompts (the flattened lists of `per_case`)."""
    if on_rows is None:
        return None
    case_of = [c for c, items in enumerate(per_case) for _ in items]
    return lambda rows: on_rows([case_of[r] for r in rows])


def ngram_entropy(text: str) -> float:
    """ROME's fluency: the weighted mean of the bi- and tri-gram entropies (bits) of the text's
    words (weights 2/3 and 4/3); words are split by a regular expression, not nltk."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n, weight in FLUENCY_WEIGHTS.items():
        grams = Counter(tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1)))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(entropy * weight)
    return sum(values) / len(values)


def _verdicts(settings: WildSettings, probes: list[WildProbe], gens: list[Generation]) -> list[dict]:
    """Every scorer's verdict on each probe (and the judge's, when there is one)."""
    out = [{name: fn(g.text, p.answer) for name, fn in sorted(SCORERS.items())}
           for p, g in zip(probes, gens)]
    if settings.judge is not None:
        items = [JudgeItem(p.prompt, g.text, p.answer) for p, g in zip(probes, gens)]
        todo = [it for it in dict.fromkeys(items) if it not in settings._verdicts]
        for item, verdict in zip(todo, settings.judge.judge(todo)):
            if verdict.error is None:  # a failed judgement is asked again for the next case
                settings._verdicts[item] = verdict
        for entry, item in zip(out, items):
            verdict = settings._verdicts.get(item)
            if verdict is None:
                verdict = Verdict(None, "", "judge failed (see the run log)")
            entry["judge"] = None if verdict.correct is None else float(verdict.correct)
            entry["judge_raw"] = verdict.raw
            if verdict.error:
                entry["judge_error"] = verdict.error
    return out


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _scores(probes: list[WildProbe], verdicts: list[dict], scorer: str,
            unchanged: list[float] | None) -> dict[str, float]:
    by_slot: dict[str, list[float | None]] = {}
    for p, v in zip(probes, verdicts):
        by_slot.setdefault(p.slot, []).append(v.get(scorer))
    scores = {}
    for slot, metric in (("prompt", "wild_reliability"), ("rephrase", "wild_generality"),
                         ("portability", "wild_portability"), ("locality", "wild_locality_correct")):
        value = _mean(by_slot.get(slot, []))
        if value is not None:
            scores[metric] = value
    if "locality" in by_slot:
        scores["wild_locality"] = 1.0 if unchanged is None else _mean(unchanged)
    return scores


def _texts(probes: list[WildProbe], gens: list[Generation]) -> dict:
    """Generations grouped by slot, as the case record keeps them."""
    out: dict = {}
    for p, g in zip(probes, gens):
        entry = {"text": g.text, "stop": g.stop, "tokens": g.n_tokens}
        if p.slot == "prompt":
            out["prompt"] = entry
        else:
            out.setdefault(p.slot, []).append(entry)
    return out


def wild_result(case: EditCase, pre: list[Generation], post: list[Generation] | None,
                settings: WildSettings,
                fluency: tuple[list[Generation], list[Generation] | None] | None = None) -> dict:
    """{"pre": scores, "post": scores (when post is given), "record": the case record's "wild"
    entry}."""
    probes = wild_probes(case)
    pre_verdicts = _verdicts(settings, probes, pre)
    result = {"pre": _scores(probes, pre_verdicts, settings.scorer, None)}
    record = {"scorer": settings.scorer, "prompt_format": settings.prompt_format,
              "max_new_tokens": settings.rules.max_new_tokens,
              "generations": {"pre": _texts(probes, pre)}, "verdicts": {"pre": _slotted(probes, pre_verdicts)}}
    if post is not None:
        post_verdicts = _verdicts(settings, probes, post)
        unchanged = [float(normalize_answer(a.text) == normalize_answer(b.text))
                     for p, a, b in zip(probes, pre, post) if p.slot == "locality"]
        result["post"] = _scores(probes, post_verdicts, settings.scorer, unchanged)
        record["generations"]["post"] = _texts(probes, post)
        record["verdicts"]["post"] = _slotted(probes, post_verdicts)
    if fluency is not None:
        before, after = fluency
        result["pre"]["fluency"] = _mean([ngram_entropy(g.text) for g in before])
        record["fluency"] = {"pre": [g.text for g in before]}
        if after is not None and "post" in result:
            result["post"]["fluency"] = _mean([ngram_entropy(g.text) for g in after])
            record["fluency"]["post"] = [g.text for g in after]
    result["record"] = record
    return result


def score_generations(case: EditCase, gens: list[Generation], settings: WildSettings,
                      unedited: list[str] | None = None) -> tuple[dict, dict]:
    """One state's generations of the case's probes scored, and their record: texts and
    verdicts. `unedited`: the unedited model's answer to each probe (wild_probes order), from
    which wild_locality is read; without it the case must have no locality probes to compare
    (a sequential run's retention check)."""
    probes = wild_probes(case)
    verdicts = _verdicts(settings, probes, gens)
    unchanged = None
    if unedited is not None:
        unchanged = [float(normalize_answer(before) == normalize_answer(g.text))
                     for p, g, before in zip(probes, gens, unedited) if p.slot == "locality"]
    return (_scores(probes, verdicts, settings.scorer, unchanged),
            {"generations": _texts(probes, gens), "verdicts": _slotted(probes, verdicts)})


def generated_texts(record: dict, state: str) -> list[str]:
    """The generated answers of a case record's `wild` entry for `state` ("pre" or "post"), in
    wild_probes order."""
    texts = record["generations"][state]
    out = [texts["prompt"]["text"]] if "prompt" in texts else []
    for slot in ("rephrase", "locality", "portability"):
        out += [e["text"] for e in texts.get(slot, [])]
    return out


def locality_verdicts(settings: WildSettings, prompts: list[str], answers: list[str],
                      gens: list[Generation]) -> list[float | None]:
    """The primary scorer's verdict on generated answers to locality prompts (is the unrelated
    fact still stated correctly)."""
    probes = [WildProbe("locality", p, a) for p, a in zip(prompts, answers)]
    return [v.get(settings.scorer) for v in _verdicts(settings, probes, gens)]


def _slotted(probes: list[WildProbe], verdicts: list[dict]) -> dict:
    out: dict = {}
    for p, v in zip(probes, verdicts):
        if p.slot == "prompt":
            out["prompt"] = v
        else:
            out.setdefault(p.slot, []).append(v)
    return out
