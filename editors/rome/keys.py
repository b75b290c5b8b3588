"""ROME's keys: the input of the edited MLP output projection at the subject's last token."""

from __future__ import annotations

import torch

from editors.rome.inputs import RomeState, Seq, batch_inputs, forward


@torch.no_grad()
def compute_keys(model, st: RomeState, rewrite: list[Seq], essence: Seq) -> torch.Tensor:
    """The projection's input at the subject's last token in each rewriting prompt (row 0:
    the bare prompt), each prompt cut just after the subject (later tokens cannot change it).
    Their mean is k*, the update's direction before C^-1."""
    seqs = rewrite + [essence]
    ids, mask, skip, extra, prefix = batch_inputs(model, st, seqs, [s.lookup + 1 for s in seqs])
    got = {}

    def hook(module, args):
        got["k"] = args[0]

    h = st.layout.layers[st.layer].mlp_out.register_forward_pre_hook(hook)
    try:
        forward(st, ids, mask, extra, prefix.width if prefix is not None else None)
    finally:
        h.remove()
    rows = torch.arange(len(rewrite), device=ids.device)
    cols = torch.tensor([s.lookup - k for s, k in zip(rewrite, skip)], device=ids.device)
    return got["k"][rows, cols].float()
