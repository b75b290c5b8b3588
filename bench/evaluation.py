"""What both run modes share: a job (a case and what to measure on it), the evaluation
protocol, one evaluation of a job (teacher forced and in the wild), the case record it makes, and
the hooks the orchestrator calls at fixed points of its loop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from bench.core.cases import EditCase
from bench.core.decoding import reference
from bench.core.generation import Generation
from bench.core.layout import output_logits
from bench.core.prefill import SharedPrefill
from bench.core.metrics import case_scores
from bench.core.probes import CaseEval, evaluate_case, predictions
from bench.core.prompts import format_case
from bench.core.wild import WildSettings, fluency_texts, generate_cases, wild_result


@dataclass
class Job:
    """One case and what to measure on it."""

    case: EditCase  # as the editor sees it (instruction-wrapped for editors that use them)
    counterfact: bool = False  # also CounterFact's probability comparisons
    wild: WildSettings | None = None  # also evaluation in the wild (generated answers)
    # the prompts share a long prefix (an edit's context) that is run once for all of them; only
    # where nothing but the input differs (no hook or module that reads a whole sequence)
    share_prefix: bool = False


@dataclass
class Protocol:
    """How a run evaluates: teacher forced (the answer fed), in the wild (Job.wild), or both;
    every probe prompt as the data gives it or in the model's chat template."""

    teacher_forced: bool = True
    prompt_format: str = "plain"


@dataclass
class EvalState:
    """What one evaluation of a job read from the model."""

    forced: CaseEval | None = None
    generations: list[Generation] | None = None
    fluency: list[Generation] | None = None
    forced_s: float = 0.0  # seconds of the teacher-forced evaluation
    wild_s: float = 0.0  # seconds of generation (this case's share of a batched one)
    cached: bool = False  # its generations were read from the answer cache, not generated


def shares_prefix(view) -> bool:
    """Whether prompts read through `view` may have a prefix they share run once: a context in
    front of every prompt, and no module or hook that could read the whole sequence."""
    return view is not None and bool(view.context) and "modules" not in view.kinds


def plain_reading(view) -> bool:
    """Whether the model read through `view` computes each position from the tokens before it
    alone, as the unedited architecture does (no edit, or weights only): then a teacher-forced
    pass over prompt + answer holds the prompt's prefill for a generation (bench.core.prefill).
    A module or hook may read the whole sequence (a codebook keyed on the last token, a router
    over all positions), and a context changes the prompt."""
    return view is None or set(view.kinds) <= {"weights"}


def shared_prefill(lm, prompts: list[str], settings: list[WildSettings], protocol: Protocol,
                   view) -> SharedPrefill | None:
    """A SharedPrefill of `prompts` (each generated with its settings' stop rules) when the
    teacher-forced pass can start them: both protocols, the model read plainly (plain_reading),
    not the reference paths; else None (generate them as usual)."""
    if not prompts or not protocol.teacher_forced or not plain_reading(view) or reference():
        return None
    return SharedPrefill(lm.model, lm.tokenizer, prompts, [s.rules for s in settings],
                         max(s.decode_batch for s in settings))


def viewed(job: Job, view) -> Job:
    """The job as the edited model is given it: its case through the edit's view (`view`: an
    edit handle; a context goes in front of every probe prompt)."""
    if view is None or not getattr(view, "context", ""):
        return job
    return replace(job, case=view.view_case(job.case), share_prefix=shares_prefix(view))


def evaluate_forced(lm, job: Job, protocol: Protocol, batch_size: int) -> CaseEval | None:
    if not protocol.teacher_forced:
        return None
    case = format_case(lm.tokenizer, job.case, protocol.prompt_format)
    return evaluate_case(lm.model, lm.tokenizer, case, counterfact=job.counterfact, batch_size=batch_size,
                         share_prefix=job.share_prefix)


def wild_groups(jobs: list[Job]) -> list[list[int]]:
    """Indices of the jobs evaluated in the wild, grouped by their settings (one generation batch
    each)."""
    groups: dict[int, list[int]] = {}
    for k, job in enumerate(jobs):
        if job.wild is not None:
            groups.setdefault(id(job.wild), []).append(k)
    return list(groups.values())


def evaluate_wild(lm, jobs: list[Job], states: list[EvalState],
                  earlier: list[EvalState] | None = None,
                  on_rows: Callable[[list[int]], None] | None = None, unedited: bool = False) -> None:
    """Generations (and fluency texts) for the jobs evaluated in the wild, batched across the
    jobs that share their settings, into `states`; with the `earlier` (pre-edit) states, only
    what the edited model no longer reproduces is decoded again. `on_rows`: told which jobs
    (indices) the rows of each forward pass belong to. `unedited`: the model holds no edit, so
    answers kept by the settings' answer cache (bench.core.answer_cache) are read, not generated,
    and the ones generated are kept."""
    for ks in wild_groups(jobs):
        settings = jobs[ks[0]].wild
        # (not on the reference paths: benchmarks and identity tests compare what they generate)
        cache = settings.answers if unedited and earlier is None and on_rows is None and not reference() else None
        if cache is not None:
            ks = _from_cache(lm, cache, jobs, states, ks)
            if not ks:
                continue
        cases = [jobs[k].case for k in ks]
        shared_prefix = all(jobs[k].share_prefix for k in ks)
        tell = None if on_rows is None else (lambda rows, ks=ks: on_rows([ks[r] for r in rows]))
        t0 = time.perf_counter()
        gens = generate_cases(lm.model, lm.tokenizer, cases, settings, settings.decode_batch,
                              earlier=[earlier[k].generations for k in ks] if earlier else None,
                              share_prefix=shared_prefix, on_rows=tell)
        flu = (fluency_texts(lm.model, lm.tokenizer, cases, settings, settings.decode_batch,
                             earlier=[earlier[k].fluency for k in ks] if earlier else None,
                             share_prefix=shared_prefix, on_rows=tell)
               if settings.fluency_tokens else [None] * len(ks))
        share = (time.perf_counter() - t0) / len(ks)
        for k, g, f in zip(ks, gens, flu):
            states[k].generations, states[k].fluency = g, f
            states[k].wild_s += share
            if cache is not None:
                cache.put(lm, jobs[k].case, settings, g, f)


def _from_cache(lm, cache, jobs: list[Job], states: list[EvalState], ks: list[int]) -> list[int]:
    """The states of the jobs `ks` whose unedited answers `cache` keeps, filled from it; the jobs
    left to generate."""
    left = []
    for k in ks:
        kept = cache.get(lm, jobs[k].case, jobs[k].wild)
        if kept is None:
            left.append(k)
        else:
            states[k].generations, states[k].fluency = kept
            states[k].cached = True
    return left


# An activation whose square overflows float32 (the precision norms compute in): the next norm
# reads inf and the model's output collapses (uniform logits: every prediction the first token),
# though every number stays finite. Real models stay many orders of magnitude below it.
OVERFLOW = math.sqrt(torch.finfo(torch.float32).max)  # about 1.8e19


def broken_edit(lm, handle, post: CaseEval | None = None, prompts: list[str] = ()) -> str | None:
    """Why an applied edit is numerically broken, or None: a NaN or infinite value in a weight it
    changed (`handle.changed`); in the post-edit teacher-forced log-probabilities `post`; or, on
    one pass over `prompts` (as the edited model is given them), in a transformer block's output
    or the next-token logits, or a block output so large that its square overflows float32
    (OVERFLOW: finite weights that blow up the activations leave every logit finite but equal).
    Modules and hooks have no weights to look at: the outputs catch those. A broken edit fails its
    case with this reason; it is never scored."""
    params = dict(lm.model.named_parameters())
    bad = [n for n in handle.changed if n in params and not bool(torch.isfinite(params[n]).all())]
    if bad:
        more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
        return (f"numerically broken edit: NaN or infinite values in the changed weight(s) "
                f"{', '.join(bad[:2])}{more}; not scored")
    if post is not None:
        probes = [post.reliability, *post.generality, *post.locality, *post.portability,
                  *([post.truth_prompt] if post.truth_prompt is not None else []),
                  *post.truth_rephrase, *post.new_on_locality]
        if not all(math.isfinite(r.mean_logprob) for r in probes):
            return "numerically broken edit: post-edit log-probabilities are NaN or infinite; not scored"
    why = _overflow(lm, list(prompts)) if prompts else None
    return f"numerically broken edit: {why}; not scored" if why else None


@torch.no_grad()
def _overflow(lm, texts: list[str]) -> str | None:
    """What overflows in one batched pass over `texts` (None: nothing): a block's output at the
    texts' real positions (NaN, inf, or beyond OVERFLOW), or the logits after each text."""
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
    real = mask.bool()
    worst: list[tuple[int, float]] = []  # (block, largest |output|), NaN counted as inf

    def record(index):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(out) and out.shape[:2] == real.shape:
                x = out[real].float().abs()
                worst.append((index, float("inf") if bool(torch.isnan(x).any()) else float(x.max())))
        return hook

    hooks = [block.register_forward_hook(record(i)) for i, block in enumerate(lm.layout.blocks)]
    try:
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    for block, value in worst:
        if not value < OVERFLOW:
            what = "NaN or infinite" if math.isinf(value) else f"{value:.3g}, beyond {OVERFLOW:.2g}"
            return f"the output of block {block} is {what} (the activations overflow)"
    last = hidden[torch.arange(len(texts), device=hidden.device), mask.sum(1) - 1]  # right padding
    if not bool(torch.isfinite(output_logits(lm.model, last).float()).all()):
        return "the edited model's logits are NaN or infinite"
    return None


def case_record(job: Job, tokenizer, pre: EvalState) -> dict:
    """The cases.jsonl record of a case as its pre-edit evaluation leaves it; `add_post` adds
    `post`, `edit` (the handle's facts) and the post-edit side of `wild`, or the loop `error`."""
    record = {"task": job.case.task, "case_id": job.case.case_id, "case": job.case.to_dict(),
              "pre": case_scores(pre.forced) if pre.forced is not None else {}, "error": None}
    if pre.forced is not None:
        record["predictions"] = {"pre": predictions(tokenizer, pre.forced)}
    if job.wild is not None:
        result = wild_result(job.case, pre.generations, None, job.wild,
                             (pre.fluency, None) if pre.fluency is not None else None)
        record["pre"].update(result["pre"])
        record["wild"] = _wild_entry(result, pre)
    return record


def _wild_entry(result: dict, pre: EvalState) -> dict:
    """The record's `wild` entry, saying where the unedited answers came from."""
    return {**result["record"], "unedited_answers": "cached" if pre.cached else "generated"}


def add_post(record: dict, job: Job, tokenizer, pre: EvalState, post: EvalState, info: dict) -> None:
    record["post"] = case_scores(post.forced, pre.forced) if post.forced is not None else {}
    if post.forced is not None:
        record["predictions"]["post"] = predictions(tokenizer, post.forced)
    if job.wild is not None:
        fluency = (pre.fluency, post.fluency) if pre.fluency is not None else None
        result = wild_result(job.case, pre.generations, post.generations, job.wild, fluency)
        record["post"].update(result["post"])
        record["wild"] = _wild_entry(result, pre)
    if info:  # the edit handle's facts
        record["edit"] = dict(info)


class RunHook:
    """What the orchestrator calls at fixed points of the case loop (every method optional to
    override). `finish` returns the block it adds to summary.json under its `name`."""

    name = ""

    def before_cases(self, todo: list[EditCase]) -> None:
        """Before the first case; the model is unedited."""

    def while_edited(self, case: EditCase, view) -> None:
        """Single mode: the case's edit (alone) is applied, its evaluation done; `view` is its
        handle (`view.view_text(text)`: a text as the edited model is given it)."""

    def at_checkpoint(self, n_edits: int, applied: list[EditCase], view=None) -> dict | None:
        """Sequential mode: the edits of `applied` (every one made so far that did not fail)
        are on the model, read through `view` (the handle of every edit so far; None when
        they are weights only); what this returns goes into the checkpoint's record under
        `name`."""
        return None

    def on_record(self, record: dict) -> None:
        """A finished case record, before it is written (a hook may add to it)."""

    def finish(self) -> dict | None:
        """After the last case, the model restored."""
        return None
