"""The rows several cases put through the model together, and the few operations on a
transformers cache that a batch of them needs.

Each case contributes ROME's sequences (editors/rome/inputs.py `build_sequences`): one rewriting
prompt per context template (row 0: the bare prompt), then the essence prompt. The rows of all
cases of one call are stacked case by case, so the run's context-prefix cache, which has one row
per template plus the essence row, serves the batch tiled once per case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bench.core.cases import EditCase
from editors.rome.inputs import Seq, build_sequences
from editors.rome.prefix_cache import PrefixCache, map_cache


class Stop(Exception):
    """Raised by a hook to end a forward pass once the blocks it needs have run."""


@dataclass
class CaseRows:
    """The rows of several cases: case c owns rows [c * per_case, (c + 1) * per_case), its
    rewriting prompts (the bare one first) then its essence prompt."""

    seqs: list[Seq]
    n_cases: int
    per_case: int

    @classmethod
    def build(cls, tokenizer, cases: list[EditCase], templates: list[str],
              kl_position: str = "after_prompt") -> "CaseRows":
        seqs: list[Seq] = []
        for case in cases:
            rewrite, essence = build_sequences(tokenizer, case, templates, kl_position)
            seqs += rewrite + [essence]
        return cls(seqs, len(cases), len(templates) + 1)

    def case_of(self, row: int) -> int:
        return row // self.per_case

    def is_essence(self, row: int) -> bool:
        return row % self.per_case == self.per_case - 1

    def bare(self, case: int) -> int:
        return case * self.per_case

    def rewrite_rows(self) -> list[int]:
        return [r for r in range(len(self.seqs)) if not self.is_essence(r)]


def truncate(cache, keep: int) -> None:
    """Every layer's entries beyond the first `keep` positions dropped, and what remains cut from
    the autograd graph. Works per layer: a pass whose lower blocks were stubbed out appended only
    to the layers above them (Cache.crop measures the first layer only)."""
    if cache is not None:
        map_cache(cache, lambda t: t[..., :keep, :].detach())


def select_rows(cache, index: torch.Tensor) -> None:
    """Keep only the batch rows `index` of every layer."""
    if cache is not None:
        map_cache(cache, lambda t: t.index_select(0, index))


def fits(prefix: PrefixCache | None, rows: CaseRows) -> bool:
    """Whether every row starts with its template's cached context tokens (a tokenisation that
    merges across the context/prompt boundary cannot reuse them)."""
    if prefix is None or len(prefix.ids) != rows.per_case:
        return False
    for r, s in enumerate(rows.seqs):
        want = prefix.ids[r % rows.per_case]
        if s.prefix_len is None or s.ids[: s.prefix_len] != want:
            return False
    return True


def tiled(prefix: PrefixCache, n: int) -> PrefixCache:
    """A copy of the run's prefix cache with its rows repeated for `n` cases (case-major, as
    CaseRows stacks them); the run's own cache is left untouched."""
    cache = copy.deepcopy(prefix.cache)
    map_cache(cache, lambda t: t.repeat(n, *([1] * (t.dim() - 1))))
    return PrefixCache(ids=prefix.ids * n, width=prefix.width, cache=cache,
                       mask=prefix.mask.repeat(n, 1))
