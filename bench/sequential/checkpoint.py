"""Sequential runs' retention: every edit made so far (or a fixed sample of them) scored on the
model that holds them all, and a checkpoint's summary."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench.core.metrics import case_scores, summarize_task
from bench.core.probes import CaseEval, ProbeResult, evaluate_cases
from bench.core.prompts import format_case
from bench.core.wild import (fluency_texts, generate_cases, generated_texts, ngram_entropy, probe_prompts,
                             score_generations)
from bench.evaluation import Job, Protocol, shared_prefill, shares_prefix, wild_groups

# Metrics read from the fixed locality probes rather than from the edited cases.
LOCALITY_METRICS = ("locality", "neighborhood", "wild_locality", "wild_locality_correct")

# --------------------------------------------------------------------------------------------
# Retention: every edit made so far
# --------------------------------------------------------------------------------------------


def _unedited_locality(ids: list[list[int]]) -> CaseEval:
    """A stand-in for a case's unedited evaluation that holds what case_scores compares
    locality with: the argmax ids over each locality answer."""
    blank = ProbeResult([], [], 0.0)
    return CaseEval(reliability=blank, locality=[ProbeResult([], list(x), 0.0) for x in ids])


def retention(lm, jobs: list[Job], protocol: Protocol, batch_size: int,
              pre: list[dict] | None = None, view=None) -> list[dict]:
    """Per job, its scores on the current model (`post`) and, in the wild, its generated answers
    (`wild`: generations and verdicts), every job's probes batched together. Reliability,
    generality and portability only (locality is the fixed probes' part), unless the jobs' `pre`
    records are given (the last checkpoint): then each case's own locality prompts are scored
    too, against its unedited readings, as single mode and EasyEdit's sequential evaluation do.
    `view`: the handle of the edits on the model; the model is given every prompt through it."""
    model, tok = lm.model, lm.tokenizer
    cases = [job.case if pre is not None else replace(job.case, locality=()) for job in jobs]
    given = [view.view_case(c) for c in cases] if view is not None else cases
    share = shares_prefix(view)
    out: list[dict] = [{"post": {}} for _ in jobs]
    prefill, per_job = _shared_prefill(lm, jobs, given, protocol, view)
    if protocol.teacher_forced:
        for cf in (False, True):
            idx = [i for i, job in enumerate(jobs) if job.counterfact == cf]
            if not idx:
                continue
            evals = evaluate_cases(model, tok, [format_case(tok, given[i], protocol.prompt_format) for i in idx],
                                   counterfact=cf, batch_size=batch_size, share_prefix=share, prefill=prefill)
            for i, ev in zip(idx, evals):
                before = _unedited_locality(pre[i]["pre_locality_ids"]) if pre is not None else None
                out[i]["post"].update(case_scores(ev, before))
    generated = _per_job(prefill.finish(), per_job) if prefill is not None else {}
    for idx in wild_groups(jobs):
        settings = jobs[idx[0]].wild
        # (no check of the unedited answers first, as single mode does: at 128 rows a decoding
        # step is cheap per row, and the teacher-forced check costs more than decoding)
        gens = ([generated[i] for i in idx] if generated else
                generate_cases(model, tok, [given[i] for i in idx], settings, settings.decode_batch,
                               share_prefix=share))
        flu = (fluency_texts(model, tok, [given[i] for i in idx], settings, settings.decode_batch,
                             share_prefix=share)
               if settings.fluency_tokens else [None] * len(idx))
        for i, g, f in zip(idx, gens, flu):
            unedited = generated_texts(pre[i]["wild"], "pre") if pre is not None else None
            scores, record = score_generations(cases[i], g, settings, unedited)
            if f is not None:
                scores["fluency"] = float(np.mean([ngram_entropy(x.text) for x in f]))
            out[i]["post"].update(scores)
            out[i]["wild"] = record
    return out


def _shared_prefill(lm, jobs: list[Job], given, protocol: Protocol, view):
    """(a SharedPrefill of every wild probe's prompt, each job's number of them) when the
    teacher-forced pass can start the generations (bench.evaluation.shared_prefill), else
    (None, None)."""
    wild = [i for i, job in enumerate(jobs) if job.wild is not None]
    prompts = {i: probe_prompts(lm.tokenizer, given[i], jobs[i].wild) for i in wild}
    prefill = shared_prefill(lm, [p for i in wild for p in prompts[i]],
                             [jobs[i].wild for i in wild for _ in prompts[i]], protocol, view)
    return (prefill, {i: len(prompts[i]) for i in wild}) if prefill is not None else (None, None)


def _per_job(gens: list, counts: dict[int, int]) -> dict[int, list]:
    out, at = {}, 0
    for i, n in counts.items():
        out[i], at = gens[at:at + n], at + n
    return out


def retention_sample(applied: list[int], size: int, seed: int, planned: int) -> list[int]:
    """The positions of `applied` (edits on the model) scored at a checkpoint: all of them when
    `size` is 0 or not smaller, else the `size` with the lowest of a fixed, seeded random rank
    given to each of the `planned` positions (so samples agree across checkpoints and resumed
    runs). In edit order."""
    if not size or size >= len(applied):
        return list(applied)
    rank = np.random.default_rng(seed).permutation(planned)
    return sorted(sorted(applied, key=lambda i: rank[i])[:size])


def checkpoint_summary(tasks: list[str], pre: dict[tuple[str, str], dict], record: dict) -> dict:
    """Per task, bench.core.metrics.summarize_task over the checkpoint: the edited cases'
    retention scores and the fixed probes' locality scores (pre = the unedited model)."""
    out = {}
    for task in tasks:
        recs = [{"pre": {k: v for k, v in pre[(task, c["case_id"])]["pre"].items() if k not in LOCALITY_METRICS},
                 "post": {k: v for k, v in c["post"].items() if k not in LOCALITY_METRICS}}
                for c in record["cases"] if c["task"] == task]
        recs += [{"pre": p["pre"], "post": p["post"]} for p in record["probes"] if p["task"] == task]
        out[task] = summarize_task(recs)
    return out
