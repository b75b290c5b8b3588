"""Several edited versions of a model's linear weights read in one batch, each row with its own.

Edits computed together (FT's `apply_many`) each change the same few linear weights; their
post-edit answers are decoded one edit at a time otherwise, a few rows per step, while a decoding
step costs about as much for 128 rows as for 4 (every weight is read once per step). With
`RowWeights`, the model keeps its unedited weights and the changed linear layers compute each
row with the version of its edit: one batch decodes the answers of all the edits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _owner(model: nn.Module, name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def supported(model: nn.Module, names) -> bool:
    """Whether every parameter of `names` is the weight or bias of an nn.Linear (the layers
    RowWeights can compute per row)."""
    modules = dict(model.named_modules())
    for name in names:
        module, attr = _owner(model, name)
        if attr not in ("weight", "bias") or not isinstance(modules.get(module), nn.Linear):
            return False
    return bool(names)


class RowWeights:
    """`versions[v]`: parameter name -> its value in version v (parameters a version leaves out
    keep the model's value). `select(rows)` says which version each row of the next forward
    passes reads; inside `active()` the changed layers compute every row with its version."""

    def __init__(self, model: nn.Module, versions: list[dict[str, torch.Tensor]]):
        names = sorted({n for v in versions for n in v})
        if not supported(model, names):
            raise ValueError("RowWeights computes nn.Linear weights and biases only")
        modules = dict(model.named_modules())
        self.versions = versions
        self.layers: dict[str, nn.Linear] = {m: modules[m] for m in {_owner(model, n)[0] for n in names}}
        self.rows: torch.Tensor | None = None

    def select(self, rows: list[int]) -> None:
        self.rows = torch.tensor(rows)

    def _hook(self, name: str):
        def hook(module: nn.Linear, args, output):
            x, rows = args[0], self.rows
            if rows is None or x.shape[0] != len(rows):
                raise RuntimeError(f"RowWeights: {len(rows) if rows is not None else 'no'} rows selected "
                                   f"for a batch of {x.shape[0]} at {name}")
            out = output.clone()
            for v in rows.unique().tolist():
                at = (rows == v).nonzero()[:, 0].to(x.device)
                mine = self.versions[v]
                weight = mine.get(f"{name}.weight", module.weight)
                bias = mine.get(f"{name}.bias", module.bias)
                out[at] = F.linear(x[at], weight, bias).to(out.dtype)
            return out
        return hook

    @contextmanager
    def active(self) -> Iterator["RowWeights"]:
        hooks = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            self.rows = None
