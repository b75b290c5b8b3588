"""Single mode: for each case, evaluate before the edit, apply it, evaluate after, restore
(run_cases; bench.runner drives it and writes the records)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Callable

import torch

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.layout import find_layout
from bench.core import rowweights
from bench.core.decoding import reference
from bench.core.replay import BlockOutputs
from bench.evaluation import (EvalState, Job, Protocol, add_post, broken_edit, case_record,
                              evaluate_forced, evaluate_wild, viewed)

# Cases whose pre-edit answers are generated together in a single-mode run (the unedited model is
# the same for all of them): a few prompts each fill a decoding batch (WildSettings.decode_batch).
WILD_WINDOW = 32
# The edited weights kept for decoding the answers of several weight edits together (run_cases).
VERSIONS_BYTES = 1 << 30
HOLD_S = 60.0  # ... and how long a finished edit's record may wait for them


def run_case(lm, editor, case: EditCase, counterfact: bool, batch_size: int) -> dict:
    """Pre-edit evaluation, edit, post-edit evaluation, restore. Never leaves the model edited."""
    return next(run_cases(lm, editor, [Job(case, counterfact)], batch_size))


def run_cases(lm, editor, jobs: list[Job], batch_size: int, reuse_unchanged_blocks: bool = True,
              while_edited: Callable[[EditCase, object], None] | None = None,
              protocol: Protocol | None = None, progress: Callable[[str], None] | None = None) -> Iterator[dict]:
    """`run_case` for several jobs, their edits computed `editor.edits_per_call` at a time
    (`apply_many`; `progress` is told when a joint call starts): the pre-edit answers of all jobs
    generated in one batch, then per call the pre-edit teacher-forced evaluations and each edit in
    turn applied, evaluated and restored, its record yielded as soon as it is complete - except
    that the post-edit answers of weight edits (of nn.Linear weights) wait and are decoded
    together, each row with its own edit's weights (bench.core.rowweights: the same answers, one
    batch instead of one per edit), and the records are yielded then, in order (at the latest
    when the kept weights reach VERSIONS_BYTES or the first has waited HOLD_S seconds: a process
    killed meanwhile loses those records, made again on resume). `while_edited(case, handle)` is
    called while the case's edit is applied, after its teacher-forced evaluation.

    The post-edit evaluation reads the model through the handle's view (a context in front of
    every prompt, modules and hooks in place). Its teacher-forced part runs the pre-edit one's
    batches again; the blocks below the lowest one the edit changed (`handle.reusable_blocks`)
    are not run again but replaced by their recorded outputs (identical results;
    `reuse_unchanged_blocks=False` runs them). A numerically broken edit (bench.evaluation.
    broken_edit: a NaN or inf in its changed weights or post-edit log-probabilities, or
    activations that overflow) gets `error` with the reason and no scores."""
    protocol = protocol or Protocol()
    model, tok = lm.model, lm.tokenizer
    layout = find_layout(model)
    pres = [EvalState() for _ in jobs]
    if progress is not None and len(jobs) > 1 and any(job.wild is not None for job in jobs):
        progress(f"{jobs[0].case.task}: the unedited model's answers for {len(jobs)} cases")
    evaluate_wild(lm, jobs, pres, unedited=True)  # the unedited model's answers, all jobs together
    records: list[dict | None] = [None] * len(jobs)
    # Weight edits: each edit's changed weights are kept and the answers of all of them decoded
    # together afterwards; their records (and every later one) are held till then.
    later: dict[int, tuple[Job, EvalState, dict[str, torch.Tensor], dict]] = {}
    held: list[dict] = []
    held_since = 0.0
    per_call = max(1, editor.edits_per_call)
    for start in range(0, len(jobs), per_call):
        ks = list(range(start, min(start + per_call, len(jobs))))
        kept = {}
        for k in ks:
            t0 = time.perf_counter()
            kept[k] = BlockOutputs(layout)
            with kept[k].record() if reuse_unchanged_blocks else nullcontext():
                pres[k].forced = evaluate_forced(lm, jobs[k], protocol, batch_size)
            pres[k].forced_s = time.perf_counter() - t0
            records[k] = case_record(jobs[k], tok, pres[k])
        if progress is not None and len(ks) > 1:
            progress(f"{jobs[ks[0]].case.task}: editing {len(ks)} cases together")
        edits = editor.apply_many(model, tok, [jobs[k].case for k in ks]) if len(ks) > 1 else None
        for k in ks:
            edits = _edit_and_evaluate(lm, editor, k, jobs[k], pres[k], records[k], edits, kept.pop(k), layout,
                                       protocol, batch_size, while_edited, later if len(jobs) > 1 else None)
            if len(ks) > 1 and "time" in records[k]:
                records[k]["time"]["edits_together"] = len(ks)
            held.append(records[k])
            if k in later and len(later) == 1:
                held_since = time.perf_counter()
            kept_bytes = sum(t.numel() * t.element_size() for _, _, v, _ in later.values() for t in v.values())
            if later and (time.perf_counter() - held_since >= HOLD_S or kept_bytes >= VERSIONS_BYTES):
                _answers_together(lm, later, pres, records, batch_size)
            if not later:
                yield from _flush(held)
    if later:
        _answers_together(lm, later, pres, records, batch_size)
    yield from _flush(held)


def _edit_and_evaluate(lm, editor, k: int, job: Job, pre: EvalState, record: dict, edits, kept: BlockOutputs,
                       layout, protocol: Protocol, batch_size: int, while_edited, later: dict | None):
    """One job's edit (the next of the joint call `edits`, or its own) applied, evaluated and
    restored into `record`; its answers left to `later` (job index -> what they need) when they
    can be decoded with other edits'. Returns what is left of the joint call."""
    model, tok = lm.model, lm.tokenizer
    t1 = time.perf_counter()
    try:
        try:
            handle = next(edits) if edits is not None else editor.apply(model, tok, job.case)
        except BenchError:
            if edits is None:
                raise
            edits = None  # the joint call failed: go on one case at a time, so the error lands on its case
            handle = editor.apply(model, tok, job.case)
    except BenchError as exc:
        record["error"] = str(exc)
        return edits
    t2 = time.perf_counter()
    post = EvalState()
    deferred = False
    try:
        seen = viewed(job, handle)  # the edited model's view: a context goes in front of every prompt
        with kept.replay(handle.reusable_blocks(layout)):
            post.forced = evaluate_forced(lm, seen, protocol, batch_size)
        post.forced_s = time.perf_counter() - t2
        # a NaN or inf in the changed weights or the edited model's outputs: an error, no scores
        broken = broken_edit(lm, handle, post.forced, prompts=[seen.case.prompt])
        if broken is not None:
            record["error"] = broken
        else:
            if later is not None and job.wild is not None and not reference() and handle.kinds == ("weights",) \
                    and rowweights.supported(model, handle.changed):
                params = dict(model.named_parameters())
                later[k] = (seen, post, {n: params[n].detach().clone() for n in handle.changed},
                            dict(handle.info))
                deferred = True
            else:
                evaluate_wild(lm, [seen], [post], earlier=[pre])
                add_post(record, job, tok, pre, post, handle.info)
            if while_edited is not None:
                while_edited(job.case, handle)
    finally:
        handle.restore()
    # Edits computed together: the first case's edit_s carries the joint computation.
    record["time"] = {"edit_s": round(t2 - t1, 4), "eval_s": round(pre.forced_s + post.forced_s, 4)}
    if job.wild is not None and not deferred:
        record["time"]["wild_s"] = round(pre.wild_s + post.wild_s, 4)
    return edits


def _flush(held: list[dict]) -> Iterator[dict]:
    while held:
        yield held.pop(0)


def _answers_together(lm, later: dict, pres: list[EvalState], records: list[dict], batch_size: int) -> None:
    """The post-edit answers of the weight edits of `later` (job index -> (job, post state, its
    changed weights, its facts)), decoded in one batch on the unedited model, each row computed
    with its own edit's weights; their records completed."""
    ks = sorted(later)
    views = rowweights.RowWeights(lm.model, [later[k][2] for k in ks])
    jobs, posts = [later[k][0] for k in ks], [later[k][1] for k in ks]
    with views.active():
        evaluate_wild(lm, jobs, posts, earlier=[pres[k] for k in ks], on_rows=views.select)
    for k, job, post in zip(ks, jobs, posts):
        add_post(records[k], job, lm.tokenizer, pres[k], post, later[k][3])
        records[k]["time"]["wild_s"] = round(pres[k].wild_s + post.wild_s, 4)
    later.clear()
