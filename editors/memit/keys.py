"""The keys MEMIT writes at each layer and the hidden states it corrects: one pass over every
case's rewriting prompts, each cut just after the subject (later tokens cannot change what is
read there), stopped after the deepest block needed."""

from __future__ import annotations

import torch

from editors.memit.rows import CaseRows, Stop
from editors.rome.tokens import pad


def template_weights(counts: list[int]) -> list[float]:
    """Weight of each template's key in a case's mean key: MEMIT's code averages within each
    context type (the bare prompt; the texts of each length), then over the types."""
    groups = [1] + [c for c in counts if c > 0]
    return [1.0 / (len(groups) * size) for size in groups for _ in range(size)]


@torch.no_grad()
def read_layers(model, layout, rows: CaseRows, key_layers: list[int], weights: list[float],
                z_layer: int | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """({layer: each case's mean key (n_cases, intermediate), float32}, block `z_layer`'s output
    at each case's subject in its bare prompt (n_cases, hidden) or None)."""
    device = next(model.parameters()).device
    rewrite = rows.rewrite_rows()
    seqs = [rows.seqs[r] for r in rewrite]
    ids, mask = pad([s.ids[: s.lookup + 1] for s in seqs], 0, device)
    at = (torch.arange(len(seqs), device=device), torch.tensor([s.lookup for s in seqs], device=device))
    got: dict = {}
    deepest = max(key_layers + ([z_layer] if z_layer is not None else []))

    def key_hook(layer):
        def hook(_module, args):
            got[layer] = args[0][at].float()
            if layer == deepest and z_layer is None:
                raise Stop
        return hook

    def z_hook(_module, _args, out):
        got["z"] = (out[0] if isinstance(out, tuple) else out)[at].float()
        if z_layer == deepest:
            raise Stop

    handles = [layout.layers[layer].mlp_out.register_forward_pre_hook(key_hook(layer)) for layer in key_layers]
    if z_layer is not None:
        handles.append(layout.blocks[z_layer].register_forward_hook(z_hook))
    try:
        layout.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    case = torch.tensor([rows.case_of(r) for r in rewrite], device=device)
    w = torch.tensor([weights[r % rows.per_case] for r in rewrite], device=device)[:, None]
    keys = {layer: torch.zeros(rows.n_cases, got[layer].shape[1], device=device).index_add(0, case, w * got[layer])
            for layer in key_layers}
    cur = None
    if z_layer is not None:
        bare = [rewrite.index(rows.bare(c)) for c in range(rows.n_cases)]
        cur = got["z"][bare]
    return keys, cur
