"""MEND's editor network: one small network per weight shape that maps the normalised gradient
factors (u, d) of an edit to new factors (u~, d~), plus one learned step size per edited weight:
dW = -lr_w sum_t d~_t u~_t^T."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from editors.mend.factors import EditTarget, Factors


class RunningNorm(nn.Module):
    """Per-dimension standardisation with statistics accumulated (Welford) while training."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the rows of `x` into the statistics. With `gather` (data-parallel training: a
        function returning every process's tensor stacked in rank order) the batch statistics of
        all processes are folded in, so every copy keeps the same statistics."""
        x = x.detach().double()
        dim = self.mean.shape[0]
        n_b = x.shape[0]
        mean_b = x.mean(0) if n_b else torch.zeros(dim, dtype=torch.float64, device=x.device)
        m2_b = ((x - mean_b) ** 2).sum(0)
        parts = torch.cat([torch.tensor([float(n_b)], dtype=torch.float64, device=x.device), mean_b, m2_b])
        for row in (gather(parts[None]) if gather is not None else parts[None]):
            self._fold(row[0], row[1:1 + dim], row[1 + dim:])

    def _fold(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b.item() == 0:
            return
        n_a = self.count.clone()
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta ** 2 * (n_a * n_b / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count.item() < 2:
            return x
        std = (self.m2 / (self.count - 1)).clamp_min(0).sqrt().float()
        return (x - self.mean.float()) / (std + 1e-7)


class LowRankResidual(nn.Module):
    """x + act(scale_c * (B A x + b) + shift_c): a rank-r linear map with a residual connection.
    B starts at zero, so the layer starts as the identity; scale/shift are per conditioning index
    (which of the weights sharing this network is being edited)."""

    def __init__(self, dim: int, rank: int, n_cond: int, relu: bool):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.b = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.cond_scale = nn.Parameter(torch.ones(n_cond, dim))
        self.cond_shift = nn.Parameter(torch.zeros(n_cond, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, cond: int) -> torch.Tensor:
        h = (x @ self.a.T) @ self.b.T + self.bias
        h = h * self.cond_scale[cond] + self.cond_shift[cond]
        if self.relu:
            h = F.relu(h)
        return x + h


class FactorNet(nn.Module):
    """Maps the concatenated, normalised factors [u, d] of one weight shape to [u~, d~]."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, n_hidden: int, n_cond: int):
        super().__init__()
        dim = in_dim + out_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = RunningNorm(dim)
        rank = max(1, min(rank, dim))
        self.layers = nn.ModuleList([LowRankResidual(dim, rank, n_cond, relu=i < n_hidden)
                                     for i in range(n_hidden + 1)])

    def forward(self, u: torch.Tensor, d: torch.Tensor, cond: int):
        x = self.norm(torch.cat([u, d], dim=-1))
        for layer in self.layers:
            x = layer(x, cond)
        return x[:, : self.in_dim], x[:, self.in_dim:]


class EditorNetwork(nn.Module):
    """One FactorNet per weight shape, shared by the weights of that shape, and one learned step
    size per edited weight."""

    def __init__(self, targets: list[EditTarget], rank: int, n_hidden: int, edit_lr: float):
        super().__init__()
        self.target_names = [t.name for t in targets]
        shapes: dict[str, tuple[int, int, int]] = {}
        for t in targets:
            _, _, n = shapes.get(t.shape_key, (t.in_dim, t.out_dim, 0))
            shapes[t.shape_key] = (t.in_dim, t.out_dim, n + 1)
        self.nets = nn.ModuleDict({k: FactorNet(i, o, rank, n_hidden, n)
                                   for k, (i, o, n) in sorted(shapes.items())})
        self.edit_lrs = nn.Parameter(torch.full((len(targets),), float(edit_lr)))

    @torch.no_grad()
    def update_norms(self, targets: list[EditTarget], factors: list[Factors],
                     gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the factors of a batch of edits (all of them, before any is normalised) into the
        input statistics of each shape's network."""
        rows: dict[str, list[torch.Tensor]] = {}
        for per_edit in factors:
            for t in targets:
                u, d = per_edit[t.name]
                rows.setdefault(t.shape_key, []).append(torch.cat([u, d], dim=-1))
        for key in sorted(self.nets):
            if key in rows or gather is not None:  # every process must join every gather
                x = torch.cat(rows[key]) if key in rows else torch.zeros(0, self.nets[key].norm.mean.shape[0])
                self.nets[key].norm.update(x, gather)

    def edit_factors_out(self, targets: list[EditTarget], factors: Factors) -> Factors:
        """name -> (U, D) with dW (out, in) = D^T U: U = -lr_w u~, D = d~."""
        out = {}
        for i, t in enumerate(targets):
            u, d = factors[t.name]
            u2, d2 = self.nets[t.shape_key](u, d, t.cond)
            out[t.name] = (-self.edit_lrs[i] * u2, d2)
        return out

    def deltas(self, targets: list[EditTarget], factors: Factors) -> dict[str, torch.Tensor]:
        """name -> dW in (out, in) terms."""
        return {n: d.T @ u for n, (u, d) in self.edit_factors_out(targets, factors).items()}


def stored_delta(t: EditTarget, delta_out_in: torch.Tensor) -> torch.Tensor:
    """dW in the weight's storage layout."""
    return delta_out_in.T if t.transposed else delta_out_in
