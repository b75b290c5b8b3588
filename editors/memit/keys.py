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
                z_layer: int | None = None, outputs: bool = False
                ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, dict[int, torch.Tensor]]:
    """({layer: each case's mean key (n_cases, intermediate), float32}, block `z_layer`'s output
    at each case's subject in its bare prompt (n_cases, hidden) or None, and with `outputs`
    {layer: the MLP output projection's output at the subject in the bare prompt (n_cases,
    hidden)}, else {})."""
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
            if layer == deepest and z_layer is None and not outputs:
                raise Stop
        return hook

    def out_hook(layer):
        def hook(_module, _args, out):
            got[("out", layer)] = out[at].float()
            if layer == deepest and z_layer is None:
                raise Stop
        return hook

    def z_hook(_module, _args, out):
        got["z"] = (out[0] if isinstance(out, tuple) else out)[at].float()
        if z_layer == deepest:
            raise Stop

    handles = [layout.layers[layer].mlp_out.register_forward_pre_hook(key_hook(layer)) for layer in key_layers]
    if outputs:
        handles += [layout.layers[layer].mlp_out.register_forward_hook(out_hook(layer)) for layer in key_layers]
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
    bare = [rewrite.index(rows.bare(c)) for c in range(rows.n_cases)]
    outs = {layer: got[("out", layer)][bare] for layer in key_layers} if outputs else {}
    cur = got["z"][bare] if z_layer is not None else None
    return keys, cur, outs


def through_post_norm(norm, out: torch.Tensor, resid: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """The change of an MLP output projection's output (n, hidden) that moves what `norm` passes
    on to the residual stream by `resid`: MEMIT spreads its residual over the edited layers as if
    each layer's MLP output were added to the stream as it is, which holds for Llama or GPT-2 but
    not for Gemma's post-feed-forward norm (a scale-free map: a change written there unmapped is
    rescaled by 1 / rms of the output and lands off target). Solved numerically (L-BFGS) for any
    norm module, with a small pull towards the current output, which fixes the otherwise free
    scale of a scale-invariant norm."""
    dtype = next(norm.parameters(), out).dtype
    with torch.no_grad():
        target = norm(out.to(dtype)).float() + resid
    scale_t = target.pow(2).sum().clamp_min(1e-12)
    scale_o = out.pow(2).sum().clamp_min(1e-12)
    new = out.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([new], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (norm(new.to(dtype)).float() - target).pow(2).sum() / scale_t \
            + 1e-4 * (new - out).pow(2).sum() / scale_o
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (new.detach() - out)
