"""Greedy generation with natural stopping: what the model says when nothing is fed to it.

`generate` decodes greedily from each prompt alone (left-padded batches, the key-value cache) and
stops a row at the first of: the end-of-sequence token; a newline after the answer has begun
(leading blank lines do not end an answer that has not started); a stop string the task names;
`max_new_tokens`. The text is cut at the stop and never truncated to any target's length; the
reason is kept (`eos`, `newline`, `stop_string`, `max_new_tokens`), so a cap that cuts answers
shows in the results.

`regenerate` gives what `generate` would give on a changed model (after an edit) when an
earlier generation from the same prompt is at hand: one teacher-forced pass over the earlier
tokens checks whether greedy decoding reproduces them (an edit leaves most unrelated answers
alone), and only the prompts where it does not are decoded again. The result is greedy decoding's
(up to float rounding at near-ties between the cached and the full-sequence computation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from bench.core.decoding import greedy_decode, in_order, plan_batches, reference, run_rows

STOP_REASONS = ("eos", "newline", "stop_string", "max_new_tokens")


@dataclass(frozen=True)
class StopRules:
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    at_newline: bool = True


@dataclass(frozen=True)
class Generation:
    text: str  # the generated answer, cut at its stop (special tokens left out)
    stop: str  # one of STOP_REASONS
    n_tokens: int  # tokens generated up to the stop
    token_ids: tuple[int, ...] = ()  # those tokens (the EOS itself left out)


def _cut(text: str, rules: StopRules) -> tuple[str, str | None]:
    """(text before the first stop marker that follows the answer's start, the marker's reason)."""
    start = len(text) - len(text.lstrip())  # markers in leading whitespace do not count
    best, reason = None, None
    markers = [(s, "stop_string") for s in rules.stop_strings if s]
    if rules.at_newline:
        markers.append(("\n", "newline"))
    for marker, why in markers:
        at = text.find(marker, start + 1)  # after the answer's first character
        if at >= 0 and (best is None or at < best):
            best, reason = at, why
    return (text, None) if best is None else (text[:best], reason)


class _NaturalStop(StoppingCriteria):
    """Per row: done once its new text holds a stop marker after the answer has begun."""

    def __init__(self, tokenizer, prompt_width: int, rules: StopRules):
        self.tokenizer, self.width, self.rules = tokenizer, prompt_width, rules

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [_cut(self.tokenizer.decode(row[self.width:], skip_special_tokens=True), self.rules)[1]
                is not None for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopCheck:
    """Whether a row's new tokens hold a stop marker after the answer has begun, asked after
    every token: only the last few tokens are decoded, and the whole row only when they hold a
    marker (to see whether the answer had begun before it)."""

    def __init__(self, tokenizer, rules: StopRules):
        self.tokenizer, self.rules = tokenizer, rules
        self.markers = [s for s in rules.stop_strings if s] + (["\n"] if rules.at_newline else [])
        # enough tokens to hold the longest marker whole, byte-level pieces included
        self.window = 2 * max((len(m) for m in self.markers), default=0) + 6

    def __call__(self, tokens: list[int]) -> bool:
        if not self.markers:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        if not any(m in tail for m in self.markers):
            return False
        return _cut(self.tokenizer.decode(tokens, skip_special_tokens=True), self.rules)[1] is not None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], rules: StopRules, batch_size: int = 32,
             share_prefix: bool = False, on_rows: Callable[[list[int]], None] | None = None) -> list[Generation]:
    """Greedy continuations of `prompts`, each stopped naturally (see the module docstring),
    decoded by bench.core.decoding.greedy_decode (each row leaves the batch when it stops;
    `share_prefix`: a token prefix the prompts share is run once; `on_rows`: told which prompts
    the rows of each forward pass are)."""
    if reference() and on_rows is None:
        return generate_reference(model, tokenizer, prompts, rules, batch_size)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    rows = greedy_decode(model, ids, rules.max_new_tokens, eos, pad, StopCheck(tokenizer, rules),
                         batch_size, share=share_prefix, on_rows=on_rows)
    return [as_generation(tokenizer, row, eos, rules) for row in rows]


@torch.no_grad()
def generate_reference(model, tokenizer, prompts: list[str], rules: StopRules,
                       batch_size: int = 32) -> list[Generation]:
    """`generate` through transformers' `generate` (the path `greedy_decode` replaced: every row
    decoded to the batch's longest, the stop rule decoding each whole row at every step)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # every row continues from its own last token
        try:
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        finally:
            tokenizer.padding_side = side
        width = enc["input_ids"].shape[1]
        # A config of our own: greedy, whatever sampling defaults the model ships with.
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=rules.max_new_tokens,
                                  pad_token_id=pad, eos_token_id=eos)
        ids = model.generate(**enc, generation_config=config,
                             stopping_criteria=StoppingCriteriaList([_NaturalStop(tokenizer, width, rules)]))
        for row in ids[:, width:].tolist():
            out.append(as_generation(tokenizer, row, eos, rules))
    return out


def as_generation(tokenizer, row: list[int], eos: int | None, rules: StopRules) -> Generation:
    """The Generation of decoded token ids `row` (up to and including its stop token): the text cut
    at its stop marker, the stop's reason and the tokens before any EOS."""
    if eos is not None and eos in row:
        tokens, reason = row[: row.index(eos)], "eos"
    else:
        tokens, reason = row, None
    text, marker = _cut(tokenizer.decode(tokens, skip_special_tokens=True), rules)
    if marker is not None:
        reason = marker
    elif reason is None:
        reason = "max_new_tokens"
    return Generation(text=text, stop=reason, n_tokens=len(tokens), token_ids=tuple(tokens))


@torch.no_grad()
def _reproduced(model, tokenizer, prompts: list[str], earlier: list[Generation], eos: int | None,
                batch_size: int, share_prefix: bool = False,
                on_rows: Callable[[list[int]], None] | None = None) -> list[bool]:
    """Whether greedy decoding on `model` gives each earlier generation again: the argmax after
    the prompt and after each earlier token is the next earlier token (and EOS where the earlier
    one ended on EOS), read in one teacher-forced pass per batch (`share_prefix`: a token prefix
    the prompts share is run once)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    expected = [list(g.token_ids) + ([eos] if g.stop == "eos" and eos is not None else []) for g in earlier]
    head = model.get_output_embeddings()
    out = [False] * len(prompts)  # nothing generated and no EOS: decoding must still stop at once
    batches = (in_order(len(ids), batch_size) if reference()
               else plan_batches(ids, batch_size, share_prefix and on_rows is None))
    for idx, shared in batches:  # (the prefix stops short of every prompt's last token)
        if on_rows is not None:
            on_rows(idx)
        hidden = run_rows(model, [ids[i] + expected[i][:-1] for i in idx], shared, pad)
        rows = [r for r, i in enumerate(idx) if expected[i]]
        if not rows:
            continue
        # every row's read positions gathered: one vocabulary projection per batch
        at = [(r, len(ids[idx[r]]) - 1 - shared + j) for r in rows for j in range(len(expected[idx[r]]))]
        picked = hidden[torch.tensor([r for r, _ in at], device=hidden.device),
                        torch.tensor([c for _, c in at], device=hidden.device)]
        # softcapping is monotone: the argmax of the raw logits is the argmax
        argmax = head(picked).argmax(-1).tolist()
        k = 0
        for r in rows:
            n = len(expected[idx[r]])
            out[idx[r]] = argmax[k:k + n] == expected[idx[r]]
            k += n
    return out


def regenerate(model, tokenizer, prompts: list[str], earlier: list[Generation], rules: StopRules,
               batch_size: int = 32, share_prefix: bool = False,
               on_rows: Callable[[list[int]], None] | None = None) -> list[Generation]:
    """`generate(model, ...)` for prompts that were generated from before (`earlier`, with the
    same rules): earlier generations the model reproduces are kept, the rest decoded again."""
    keep = _reproduced(model, tokenizer, prompts, earlier, tokenizer.eos_token_id, batch_size, share_prefix,
                       on_rows)
    todo = [i for i, ok in enumerate(keep) if not ok]
    again = None if on_rows is None else (lambda rows: on_rows([todo[r] for r in rows]))
    fresh = (generate(model, tokenizer, [prompts[i] for i in todo], rules, batch_size, share_prefix, again)
             if todo else [])
    out = list(earlier)
    for i, gen in zip(todo, fresh):
        out[i] = gen
    return out
