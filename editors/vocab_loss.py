"""Negative log-likelihood of given tokens at a few positions, with one read of the vocabulary
matrix per step on CPU.

An editor's loss reads the vocabulary projection at a handful of positions. With a 49k x 576
output matrix (113 MB in float32) that projection is memory-bound on a CPU: the forward pass
reads the matrix once for the logits and the backward pass reads it again for the gradient with
respect to the hidden state. `ChunkedTokenNLL` computes the NLL and that gradient together, in
one pass over row blocks of the matrix (an online log-sum-exp, rescaling the running sums as
the maximum grows), so each block is read from memory once while it is still in cache. The
result is the same function (equal up to float rounding); the matrix must be frozen (no
gradient flows to it).

`token_nll` picks this path on CPU for a plain bias-free output layer without logit soft-capping
and falls back to the ordinary log-softmax everywhere else (GPUs do not need it).
"""

from __future__ import annotations

import torch

from bench.core.layout import logit_softcapping, output_logits

CHUNK_ROWS = 1024  # 1024 x 576 float32 = 2.4 MB per block: stays in cache between its two uses


class ChunkedTokenNLL(torch.autograd.Function):
    """nll[i] = logsumexp(E h[i]) - (E h[i])[t[i]] for hidden states h (P, d), frozen E (V, d)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = hidden.detach()
        n = h.shape[0]
        run_max = torch.full((n, 1), -float("inf"), dtype=h.dtype, device=h.device)
        run_sum = torch.zeros((n, 1), dtype=h.dtype, device=h.device)
        run_vec = torch.zeros_like(h)  # sum_j exp(z_j - max) E_j: the softmax-weighted rows
        for start in range(0, weight.shape[0], CHUNK_ROWS):
            block = weight[start:start + CHUNK_ROWS]
            z = h @ block.T
            new_max = torch.maximum(run_max, z.amax(1, keepdim=True))
            rescale = torch.exp(run_max - new_max)
            ez = torch.exp(z - new_max)
            run_sum = run_sum * rescale + ez.sum(1, keepdim=True)
            run_vec = run_vec * rescale + ez @ block
            run_max = new_max
        target_rows = weight[targets]
        nll = (run_max + run_sum.log()).squeeze(1) - (h * target_rows).sum(1)
        ctx.save_for_backward(run_vec / run_sum - target_rows)  # d nll[i] / d h[i]
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_nll[:, None] * grad_hidden, None, None


def _plain_output_weight(model) -> torch.Tensor | None:
    head = model.get_output_embeddings()
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None
            or logit_softcapping(model) or head.weight.requires_grad):
        return None
    return head.weight


def token_nll(model, hidden: torch.Tensor, targets: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Per-position NLL of `targets` (P,) given final hidden states `hidden` (P, d), float32.
    fused=False always takes the ordinary log-softmax (the plain path, for benchmarks)."""
    weight = _plain_output_weight(model) if fused and hidden.device.type == "cpu" else None
    if weight is not None and hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return ChunkedTokenNLL.apply(hidden, weight, targets)
    logp = torch.log_softmax(output_logits(model, hidden).float(), -1)
    return -logp.gather(1, targets[:, None]).squeeze(1)
