"""ROME's rank-one update of one projection weight."""

from __future__ import annotations

import torch
from torch import nn

from bench.core.layout import weight_out_in


@torch.no_grad()
def rank_one_update(module: nn.Module, key: torch.Tensor, value: torch.Tensor,
                    c_inv: torch.Tensor | None, residual_key: torch.Tensor | None = None) -> None:
    """Change `module` (nn.Linear or GPT-2 Conv1D) in place so that module(k) == value for
    k = residual_key (default: key): W <- W + (value - module(k)) u^T / (u^T k), with the update
    direction u = C^-1 key (u = key when c_inv is None)."""
    w = weight_out_in(module)  # (out, in) view of the stored weight
    u = key.to(torch.float32)
    u = u if c_inv is None else c_inv.to(u.device, torch.float32) @ u
    k = (key if residual_key is None else residual_key).to(torch.float32)
    current = w.float() @ k
    bias = getattr(module, "bias", None)
    if bias is not None:
        current = current + bias.float()
    residual = value.to(torch.float32) - current
    upd = torch.outer(residual, u) / torch.dot(u, k)
    w.add_(upd.to(w.dtype))
