"""Generations that start where the teacher-forced pass already is.

A teacher-forced probe runs prompt + answer[:-1] through the model (bench.core.probes); greedy
generation from the same prompt needs that prompt's keys and values and the argmax after its
last token, and both are in that pass. `SharedPrefill` takes them from it - `score_probes` hands
it every batch's final hidden states and key-value cache - so a generation's own prefill is not
run: its first token is the argmax of the logits at the prompt's last position, and decoding goes
on from the prompt's keys and values, gathered from the teacher-forced rows into left-padded
batches of `batch_size` rows (bench.core.decoding.continue_greedy, each row with its own stop
rules). Prompts that no teacher-forced sequence begins with, and rows whose keys and values the
pass did not keep whole (a sliding window already full), are generated as usual by `finish`.

The model, the tokens and the positions are those of a separate prefill; only the batch shapes
differ, so the values differ at most in float rounding and the greedy tokens agree except at an
exact near-tie (tests/test_prefill.py checks them against `generate`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from bench.core.decoding import continue_greedy
from bench.core.generation import Generation, StopCheck, StopRules, as_generation, generate
from bench.core.layout import output_logits


class SharedPrefill:
    """Greedy generations of `prompts` (each with its own stop rules), started from the
    teacher-forced batches that `score_probes(..., prefill=self)` runs; `finish` returns them."""

    def __init__(self, model, tokenizer, prompts: list[str], rules: list[StopRules], batch_size: int):
        self.model, self.tokenizer, self.prompts, self.rules = model, tokenizer, prompts, rules
        self.batch_size = batch_size
        self.ids = [tuple(tokenizer(p)["input_ids"]) for p in prompts]
        self.eos = tokenizer.eos_token_id
        checks: dict[StopRules, StopCheck] = {}
        self.stops = [checks.setdefault(r, StopCheck(tokenizer, r)) for r in rules]
        self.tokens: list[list[int] | None] = [None] * len(prompts)
        self.taken: set[int] = set()  # prompts whose first token and keys/values are at hand
        self.hosts: dict[int, list[int]] = {}  # run of the current score_probes call -> prompts
        self.pending: list[tuple[int, int, list]] = []  # (prompt, first token, per layer (k, v))

    def attach(self, run_of_prefix: dict[tuple[int, ...], int]) -> None:
        """Called by score_probes before its batches, with every prefix of every sequence it will
        run (-> that sequence's index): the prompts not yet taken that one of them begins with
        are read from it."""
        self.hosts = {}
        for i, ids in enumerate(self.ids):
            if ids and i not in self.taken and self.rules[i].max_new_tokens > 0 and ids in run_of_prefix:
                self.hosts.setdefault(run_of_prefix[ids], []).append(i)

    @torch.no_grad()
    def take(self, chunk: list[int], hidden: torch.Tensor, cache) -> None:
        """From one teacher-forced batch (the indices of its runs, right padded, nothing shared;
        its final hidden states and key-value cache): the first token and the prompt's keys and
        values of every prompt read from these runs. Full batches are decoded at once."""
        found = [(r, i) for r, run in enumerate(chunk) for i in self.hosts.get(run, ())]
        layers = getattr(cache, "layers", None)
        if not found or not layers or not all(_whole(layer, hidden.shape[1]) for layer in layers):
            return  # left to `finish`
        device = hidden.device
        rows = torch.tensor([r for r, _ in found], device=device)
        cols = torch.tensor([len(self.ids[i]) - 1 for _, i in found], device=device)
        first = output_logits(self.model, hidden[rows, cols]).argmax(-1).tolist()
        for (r, i), token in zip(found, first):
            n = len(self.ids[i])
            self.taken.add(i)
            self.pending.append((i, token, [(layer.keys[r, :, :n], layer.values[r, :, :n]) for layer in layers]))
        while len(self.pending) >= self.batch_size:
            self._decode(self.pending[:self.batch_size])
            self.pending = self.pending[self.batch_size:]

    def _decode(self, batch: list[tuple[int, int, list]]) -> None:
        """Decode rows whose prompts' keys/values were taken: left padded into one cache, as a
        prefill of those prompts would have left it (positions counted from each row's start)."""
        lengths = [len(self.ids[i]) for i, _, _ in batch]
        width, n = max(lengths), len(batch)
        cache = DynamicCache(config=self.model.config)
        for li in range(len(batch[0][2])):
            k0, v0 = batch[0][2][li]
            keys = k0.new_zeros((n, k0.shape[0], width, k0.shape[-1]))
            values = v0.new_zeros((n, v0.shape[0], width, v0.shape[-1]))
            for b, (_, _, kv) in enumerate(batch):
                keys[b, :, width - lengths[b]:] = kv[li][0]
                values[b, :, width - lengths[b]:] = kv[li][1]
            cache.update(keys, values, li)
        device = batch[0][2][0][0].device
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for b, length in enumerate(lengths):
            mask[b, width - length:] = 1
        last = torch.tensor(lengths, device=device) - 1
        first = torch.tensor([t for _, t, _ in batch], device=device)
        outs: list[list[int]] = [[] for _ in batch]
        continue_greedy(self.model, cache, mask, last, first, outs,
                        [self.rules[i].max_new_tokens for i, _, _ in batch], self.eos,
                        [self.stops[i] for i, _, _ in batch])
        for (i, _, _), out in zip(batch, outs):
            self.tokens[i] = out

    def finish(self) -> list[Generation]:
        """Every prompt's generation: the rows taken and not yet decoded are decoded, and the
        prompts never taken are generated from their own prefill (grouped by stop rules)."""
        for start in range(0, len(self.pending), self.batch_size):
            self._decode(self.pending[start:start + self.batch_size])
        self.pending = []
        out: list[Generation | None] = [None] * len(self.prompts)
        rest: dict[StopRules, list[int]] = {}
        for i, tokens in enumerate(self.tokens):
            if tokens is None:
                rest.setdefault(self.rules[i], []).append(i)
            else:
                out[i] = as_generation(self.tokenizer, tokens, self.eos, self.rules[i])
        for rules, idx in rest.items():
            for i, gen in zip(idx, generate(self.model, self.tokenizer, [self.prompts[i] for i in idx], rules,
                                            self.batch_size)):
                out[i] = gen
        return out


def _whole(layer, width: int) -> bool:
    """Whether a cache layer holds every column of the pass (a sliding window may have dropped
    the first ones)."""
    keys = getattr(layer, "keys", None)
    return isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[-2] == width
