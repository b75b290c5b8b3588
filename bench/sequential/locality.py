"""Sequential runs' fixed locality probes: drawn once per run with the seed, read on the unedited
model first and again at every checkpoint (teacher forced and in the wild)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from bench.core.cases import EditCase
from bench.core.generation import Generation, generate, regenerate
from bench.core.probes import score_probes
from bench.core.prompts import format_prompt
from bench.core.scorers import normalize_answer
from bench.core.wild import locality_verdicts
from bench.evaluation import Job, Protocol, shared_prefill, shares_prefix

# --------------------------------------------------------------------------------------------
# Locality probes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalityProbe:
    task: str
    case_id: str  # the case it was drawn from
    index: int  # its place in that case's locality list
    prompt: str
    answer: str  # the unrelated fact's answer
    target_new: str  # that case's target (CounterFact's neighbourhood comparison)


def draw_locality_probes(items: list[tuple[str, EditCase]], per_task: int, seed: int) -> list[LocalityProbe]:
    """`per_task` locality prompts of each task, drawn with the seed from the locality lists of
    the run's cases (all of them when there are fewer), in case order."""
    by_task: dict[str, list[LocalityProbe]] = {}
    for task, case in items:
        for i, pa in enumerate(case.locality):
            by_task.setdefault(task, []).append(
                LocalityProbe(task, case.case_id, i, pa.prompt, pa.answer, case.target_new))
    out = []
    for task, candidates in by_task.items():
        rng = random.Random(f"locality-probes:{seed}:{task}")
        picked = sorted(rng.sample(range(len(candidates)), min(per_task, len(candidates))))
        out += [candidates[i] for i in picked]
    return out


def _generation_entry(g: Generation) -> dict:
    return {"text": g.text, "stop": g.stop, "tokens": g.n_tokens, "token_ids": list(g.token_ids)}


def _as_generation(entry: dict) -> Generation:
    return Generation(entry["text"], entry["stop"], entry["tokens"], tuple(entry["token_ids"]))


def read_probes(lm, probes: list[LocalityProbe], jobs_by_task: dict[str, Job], protocol: Protocol,
                batch_size: int, earlier: list[dict] | None = None, view=None) -> list[dict]:
    """What the model says on each probe: teacher forced, the argmax tokens over the answer and
    its log-probability (and target_new's, for CounterFact's neighbourhood comparison); in the
    wild, the generated answer and the primary scorer's verdict on it. With the `earlier`
    (unedited) readings, generations the model still reproduces are not decoded again, unless the
    generations start from the teacher-forced pass (bench.core.prefill: both protocols, a model
    read plainly), which costs less than that check. `view`: the handle of the edits on the
    model (a context goes in front of every probe prompt)."""
    model, tok = lm.model, lm.tokenizer
    out: list[dict] = [{} for _ in probes]
    seen = view.view_text if view is not None else (lambda text: text)
    share = shares_prefix(view)
    fmt = lambda text: format_prompt(tok, seen(text), protocol.prompt_format)  # noqa: E731
    wild = [i for i, p in enumerate(probes) if jobs_by_task[p.task].wild is not None]
    wild_prompt = {i: format_prompt(tok, seen(probes[i].prompt), jobs_by_task[probes[i].task].wild.prompt_format)
                   for i in wild}
    # the generations start from the teacher-forced pass where they can (bench.core.prefill)
    prefill = shared_prefill(lm, [wild_prompt[i] for i in wild], [jobs_by_task[probes[i].task].wild for i in wild],
                             protocol, view)
    if protocol.teacher_forced and probes:
        for o, r in zip(out, score_probes(model, tok, [(fmt(p.prompt), p.answer) for p in probes], batch_size,
                                          share_prefix=share, prefill=prefill)):
            o.update(pred_ids=r.pred_ids, true_lp=r.mean_logprob)
        cf = [i for i, p in enumerate(probes) if jobs_by_task[p.task].counterfact]
        news = score_probes(model, tok, [(fmt(probes[i].prompt), probes[i].target_new) for i in cf], batch_size,
                            share_prefix=share)
        for i, r in zip(cf, news):
            out[i]["new_lp"] = r.mean_logprob
    started = dict(zip(wild, prefill.finish())) if prefill is not None else {}
    groups: dict[int, list[int]] = {}
    for i in wild:
        groups.setdefault(id(jobs_by_task[probes[i].task].wild), []).append(i)
    for idx in groups.values():
        settings = jobs_by_task[probes[idx[0]].task].wild
        prompts = [wild_prompt[i] for i in idx]
        if started:
            gens = [started[i] for i in idx]
        elif earlier is None:
            gens = generate(model, tok, prompts, settings.rules, settings.decode_batch, share)
        else:
            gens = regenerate(model, tok, prompts, [_as_generation(earlier[i]["generation"]) for i in idx],
                              settings.rules, settings.decode_batch, share)
        verdicts = locality_verdicts(settings, [probes[i].prompt for i in idx],
                                     [probes[i].answer for i in idx], gens)
        for i, g, v in zip(idx, gens, verdicts):
            out[i].update(generation=_generation_entry(g), correct=v)
    return out


def probe_scores(pre: dict, now: dict | None) -> dict[str, float]:
    """A probe's locality scores in [0, 1] on a model state (`now`) against the unedited readings
    (`pre`); `now=None` gives the unedited model's own scores."""
    now = pre if now is None else now
    scores: dict[str, float] = {}
    if "pred_ids" in now:
        scores["locality"] = float(np.mean([a == b for a, b in zip(now["pred_ids"], pre["pred_ids"])]))
    if "new_lp" in now:
        scores["neighborhood"] = float(now["true_lp"] > now["new_lp"])
    if "generation" in now:
        scores["wild_locality"] = float(normalize_answer(now["generation"]["text"])
                                        == normalize_answer(pre["generation"]["text"]))
        if now.get("correct") is not None:
            scores["wild_locality_correct"] = float(now["correct"])
    return scores
