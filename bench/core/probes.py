"""Reading the model: teacher-forced probes (a prompt followed by an answer).

For each probe we read, at the answer's positions only, the argmax token and the log-probability
of the answer token (`score_probes`); `evaluate_case` does it for every probe of one edit case in
one batched pass, giving the `CaseEval` that bench.core.metrics turns into scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bench.core.cases import EditCase
from bench.core.decoding import MIN_SHARED, in_order, plan_batches, reference, run_rows, run_rows_cached
from bench.core.layout import output_logits


# --------------------------------------------------------------------------------------------
# Tokenisation of a prompt and its answer
# --------------------------------------------------------------------------------------------


def encode_probe(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with the tokenizer's usual special tokens) and of `answer` as its
    continuation: a separating space is added unless one side already has it, and no special
    token is placed in the middle. When tokenising the joined text reproduces the prompt's ids as
    a prefix, the answer ids are the remainder (exactly what the model sees in running text);
    otherwise the answer is tokenised on its own."""
    if not answer:
        raise ValueError("empty answer")
    sep = "" if (not prompt or prompt[-1].isspace() or answer[0].isspace()) else " "
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + sep + answer)["input_ids"]
    eos = tokenizer.eos_token_id
    # Tokenizers that append EOS would put it at the end of both; compare without it.
    if eos is not None and prompt_ids and prompt_ids[-1] == eos and full_ids and full_ids[-1] == eos:
        prompt_ids, full_ids = prompt_ids[:-1], full_ids[:-1]
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):]
    answer_ids = tokenizer(sep + answer, add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


@dataclass
class ProbeResult:
    answer_ids: list[int]
    pred_ids: list[int]  # argmax at each answer position (teacher forced)
    mean_logprob: float  # mean over answer tokens of log P(answer token | prefix)

    @property
    def accuracy(self) -> float:
        return float(np.mean([p == a for p, a in zip(self.pred_ids, self.answer_ids)]))


@torch.no_grad()
def score_probes(model, tokenizer, probes: list[tuple[str, str]], batch_size: int = 32,
                 share_prefix: bool = False, prefill=None) -> list[ProbeResult]:
    """Teacher-forced argmax and log-probabilities at the answer positions of each probe.

    Answer token j is predicted at position len(prompt) - 1 + j, which sees only the prompt and
    the answer's earlier tokens, so the sequence run is prompt + answer[:-1]. A probe whose
    sequence is a prefix of another's (the same prompt with a one-token answer, say: CounterFact's
    new and true answers) is read from that one's row - causal attention keeps its positions
    blind to what follows. Right padding keeps every real token at the position it has unbatched;
    vocabulary logits are computed only at the answer positions (the vocabulary projection
    dominates the cost). `share_prefix`: sequences with a long common token prefix (an in-context
    edit's context) are batched together and the prefix run once (bench.core.decoding). `prefill`
    (a bench.core.prefill.SharedPrefill): generations from prompts these sequences begin with
    are started from this pass (its hidden states and key-value cache are handed to it)."""
    device = next(model.parameters()).device
    encoded = [encode_probe(tokenizer, p, a) for p, a in probes]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The sequences actually run, longest first, and which one each probe is read from.
    runs: list[tuple[int, ...]] = []
    run_of_prefix: dict[tuple[int, ...], int] = {}
    readers: dict[int, list[int]] = {}
    for i in sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1])):
        p_ids, a_ids = encoded[i]
        seq = tuple(p_ids + a_ids[:-1])
        if seq not in run_of_prefix:
            for k in range(1, len(seq) + 1):
                run_of_prefix.setdefault(seq[:k], len(runs))
            runs.append(seq)
        readers.setdefault(run_of_prefix[seq], []).append(i)
    results: list[ProbeResult | None] = [None] * len(encoded)
    if prefill is not None and not reference():  # (on the reference paths it generates everything itself)
        prefill.attach(run_of_prefix)
    else:
        prefill = None
    batches = (plan_batches([list(s) for s in runs], batch_size, share=True) if share_prefix and not reference()
               else in_order(len(runs), batch_size))
    for chunk, shared in batches:
        # the prefix stops short of every sequence's first read position
        shared = min([shared] + [len(encoded[i][0]) - 1 for r in chunk for i in readers[r]])
        shared = shared if shared >= MIN_SHARED else 0
        rows, cols, targets, owners = [], [], [], []
        for k, r in enumerate(chunk):
            for i in readers[r]:
                p_ids, a_ids = encoded[i]
                for j, tok in enumerate(a_ids):
                    rows.append(k)
                    cols.append(len(p_ids) - 1 + j - shared)  # the position that predicts answer token j
                    targets.append(tok)
                owners.append(i)
        if prefill is not None and not shared:
            hidden, cache = run_rows_cached(model, [list(runs[r]) for r in chunk], pad)
            prefill.take(chunk, hidden, cache)
        else:
            hidden = run_rows(model, [list(runs[r]) for r in chunk], shared, pad)
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logprobs = torch.log_softmax(output_logits(model, picked).float(), dim=-1)
        target_t = torch.tensor(targets, device=device)
        tok_lp = logprobs.gather(1, target_t[:, None])[:, 0].cpu().tolist()
        argmax = logprobs.argmax(dim=-1).cpu().tolist()
        k = 0
        for i in owners:
            a_ids = encoded[i][1]
            n = len(a_ids)
            results[i] = ProbeResult(answer_ids=list(a_ids), pred_ids=argmax[k:k + n],
                                     mean_logprob=float(np.mean(tok_lp[k:k + n])))
            k += n
    return results


# --------------------------------------------------------------------------------------------
# Per-case evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class CaseEval:
    """Everything read from the model for one case in one state (pre- or post-edit)."""

    reliability: ProbeResult
    generality: list[ProbeResult] = field(default_factory=list)
    locality: list[ProbeResult] = field(default_factory=list)
    portability: list[ProbeResult] = field(default_factory=list)
    # CounterFact probability comparison: ground-truth probes on prompt and rephrases, and
    # target_new probes on locality prompts.
    truth_prompt: ProbeResult | None = None
    truth_rephrase: list[ProbeResult] = field(default_factory=list)
    new_on_locality: list[ProbeResult] = field(default_factory=list)


def build_probes(case: EditCase, counterfact: bool) -> list[tuple[str, tuple[str, str]]]:
    """(slot, (prompt, answer)) pairs for every probe the case needs, in a fixed order."""
    probes = [("reliability", (case.prompt, case.target_new))]
    probes += [("generality", (p, case.target_new)) for p in case.rephrase_prompts]
    probes += [("locality", (pa.prompt, pa.answer)) for pa in case.locality]
    probes += [("portability", (pa.prompt, pa.answer)) for pa in case.portability]
    if counterfact and case.ground_truth:
        probes.append(("truth_prompt", (case.prompt, case.ground_truth)))
        probes += [("truth_rephrase", (p, case.ground_truth)) for p in case.rephrase_prompts]
        probes += [("new_on_locality", (pa.prompt, case.target_new)) for pa in case.locality]
    return probes


def evaluate_case(model, tokenizer, case: EditCase, counterfact: bool = False,
                  batch_size: int = 32, share_prefix: bool = False) -> CaseEval:
    """All probes of one case in one batched pass."""
    probes = build_probes(case, counterfact)
    results = score_probes(model, tokenizer, [p for _, p in probes], batch_size=batch_size,
                           share_prefix=share_prefix)
    slots: dict[str, list[ProbeResult]] = {}
    for (slot, _), res in zip(probes, results):
        slots.setdefault(slot, []).append(res)
    return CaseEval(
        reliability=slots["reliability"][0],
        generality=slots.get("generality", []),
        locality=slots.get("locality", []),
        portability=slots.get("portability", []),
        truth_prompt=slots.get("truth_prompt", [None])[0],
        truth_rephrase=slots.get("truth_rephrase", []),
        new_on_locality=slots.get("new_on_locality", []),
    )


def evaluate_cases(model, tokenizer, cases: list[EditCase], counterfact: bool = False,
                   batch_size: int = 32, share_prefix: bool = False, prefill=None) -> list[CaseEval]:
    """`evaluate_case` for many cases in one batched pass over all their probes (a sequential
    run's checkpoints score every edit made so far this way; `prefill`: as for score_probes)."""
    per_case = [build_probes(case, counterfact) for case in cases]
    results = score_probes(model, tokenizer, [p for probes in per_case for _, p in probes],
                           batch_size=batch_size, share_prefix=share_prefix, prefill=prefill)
    out, at = [], 0
    for probes in per_case:
        slots: dict[str, list[ProbeResult]] = {}
        for (slot, _), res in zip(probes, results[at: at + len(probes)]):
            slots.setdefault(slot, []).append(res)
        at += len(probes)
        out.append(CaseEval(
            reliability=slots["reliability"][0], generality=slots.get("generality", []),
            locality=slots.get("locality", []), portability=slots.get("portability", []),
            truth_prompt=slots.get("truth_prompt", [None])[0],
            truth_rephrase=slots.get("truth_rephrase", []),
            new_on_locality=slots.get("new_on_locality", [])))
    return out


def predictions(tokenizer, ev: CaseEval) -> dict:
    """Decoded argmax tokens at the answer positions, for drill-down."""
    dec = lambda r: tokenizer.decode(r.pred_ids)  # noqa: E731
    out = {"prompt": dec(ev.reliability), "rephrase": [dec(r) for r in ev.generality],
           "locality": [dec(r) for r in ev.locality]}
    if ev.portability:
        out["portability"] = [dec(r) for r in ev.portability]
    return out
