"""The GRACE adaptor: a module that wraps one projection and holds the codebook.

At every token position the adaptor reads the projection's input x_t (the query), finds the
nearest key, and where x_t lies within that key's radius replaces the projection's output at
t by the key's value; everywhere else the output is the projection's own, bit for bit (the
tensor the wrapped projection returned, untouched, when no position is covered). The decision
at t depends only on x_t, which a causal model computes from the tokens up to t: a prompt fed
alone, the same prompt followed by its answer (teacher forcing), or the prompt and then one
generated token at a time through the key-value cache give the same decision at every position.
"""

from __future__ import annotations

import torch
from torch import nn

from editors.grace.codebook import Codebook


class GraceAdaptor(nn.Module):
    """`layer` (the wrapped projection) followed by the codebook lookup. `block`: the
    transformer block it sits in. While an edit trains, `trainee` = (entry, value tensor) stands
    for that entry's stored value, so that the loss reaches it."""

    def __init__(self, layer: nn.Module, block: int, codebook: Codebook):
        super().__init__()
        self.layer = layer
        self.block = block
        self.codebook = codebook
        self.trainee: tuple[int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(x, *args, **kwargs)
        return self.replaced(x, out)

    def replaced(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` with the value of the nearest key at every position whose input is covered."""
        book = self.codebook
        if book.size == 0:
            return out
        covered, index = book.lookup(x.detach())
        if not bool(covered.any()):
            return out
        values = book.values[: book.size]
        if self.trainee is not None:
            entry, value = self.trainee
            values = torch.cat([values[:entry], value.reshape(1, -1), values[entry + 1:]])
        flat = out.reshape(-1, out.shape[-1])
        new = torch.where(covered.to(flat.device)[:, None], values[index].to(flat.device, flat.dtype), flat)
        return new.reshape(out.shape)

    def extra_repr(self) -> str:
        return f"block={self.block}, entries={self.codebook.size}"
