"""What one WISE edit trains on: the edit prompt in EasyEdit's context templates, with the new
target, and irrelevant inputs for the routing loss, as one right-padded batch.

EasyEdit (`get_context_templates`, `tokenize`): the bare prompt and the prompt after ten short
texts the unedited model generates greedily from five starters ("I", "You", "Because", "Yes",
"Q: ") with 5 and 10 new tokens, each followed by the target (the loss reads only the target:
`objective_optimization: only_label`), plus one irrelevant input (its example takes the `loc`
question and answer of the train file) whose activation score the routing loss pushes down.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from bench.core.cases import EditCase
from bench.core.probes import encode_probe

STARTERS = ("I", "You", "Because", "Yes", "Q: ")


@torch.no_grad()
def context_prefixes(model, tokenizer, lengths: list[int]) -> list[str]:
    """"" (the bare prompt) and, for each length, the greedy continuation of each starter by that
    many tokens (EasyEdit's templates "<text> {}"), decoded without special tokens."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = [""]
    for length in lengths:
        config = GenerationConfig(max_new_tokens=length, do_sample=False, num_beams=1, pad_token_id=pad,
                                  eos_token_id=eos)
        for starter in STARTERS:
            enc = tokenizer(starter, return_tensors="pt").to(device)
            ids = model.generate(**enc, generation_config=config)
            out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return out


def with_prefix(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}" if prefix else prompt


def pick_irrelevant(case: EditCase, pool: list[str] | None, count: int, seed: int) -> tuple[list[str], str]:
    """`count` irrelevant texts for `case` and where they come from: drawn from `pool` (the
    train split's locality prompts with their answers) with a generator seeded by the case, else
    the case's own locality prompts with their answers, else none."""
    if pool:
        rng = random.Random(f"wise-irrelevant:{seed}:{case.task}:{case.case_id}")
        return rng.sample(pool, min(count, len(pool))), "train_split"
    own = [f"{pa.prompt} {pa.answer}" for pa in case.locality][:count]
    return own, ("case" if own else "none")


@dataclass
class EditBatch:
    """One edit's training rows, right-padded: the edit rows first (each template), then the
    irrelevant ones. `reads`: (row, position, target token) of every target token the loss reads;
    `out_positions`: the real positions of the irrelevant rows."""

    ids: torch.Tensor
    mask: torch.Tensor
    n_edit: int
    read_rows: torch.Tensor
    read_cols: torch.Tensor
    targets: torch.Tensor
    out_positions: torch.Tensor  # (B, W) bool

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "attention_mask": self.mask}


def build_batch(tokenizer, prefixes: list[str], case: EditCase, irrelevant: list[str], device) -> EditBatch:
    rows: list[list[int]] = []
    reads: list[tuple[int, int, int]] = []
    for prefix in prefixes:
        prompt_ids, target_ids = encode_probe(tokenizer, with_prefix(prefix, case.prompt), case.target_new)
        r = len(rows)
        rows.append(prompt_ids + target_ids[:-1])
        reads += [(r, len(prompt_ids) - 1 + j, t) for j, t in enumerate(target_ids)]
    n_edit = len(rows)
    rows += [tokenizer(text)["input_ids"] for text in irrelevant]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    out_positions = mask.bool().clone()
    out_positions[:n_edit] = False
    r, c, t = (torch.tensor(v) for v in zip(*reads))
    return EditBatch(ids.to(device), mask.to(device), n_edit, r.to(device), c.to(device), t.to(device),
                     out_positions.to(device))
