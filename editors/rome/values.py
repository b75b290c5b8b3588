"""ROME's value v*: the edited projection's original output at the subject's last token plus a
delta optimised so that the target follows every rewriting prompt, while a next-token
distribution of the essence prompt (at the position `kl_position` selects, the essence Seq's
kl_pos) stays close to the original (KL) and the delta stays small (weight decay, norm clamp)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from bench.core.layout import output_logits
from editors.rome.hparams import RomeHparams
from editors.rome.inputs import RomeState, Seq, batch_inputs, cache_fixed_tokens, forward
from editors.rome.prefix_cache import crop


class _Reads(NamedTuple):
    """The positions whose logits the loss reads: (row, column) of each target prediction, then
    the essence position; each target token's label, owning rewrite prompt and weight (1 / the
    prompt's target length)."""
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor
    weights: torch.Tensor


def _positions(rewrite: list[Seq], essence: Seq, skip: list[int], width: int,
               device) -> tuple[torch.Tensor, _Reads]:
    """(where the delta goes: a (batch, width, 1) mask of each sequence's subject-last token,
    the positions the loss reads), in the batch's columns (each row starts `skip` tokens in)."""
    seqs = rewrite + [essence]
    edit_mask = torch.zeros(len(seqs), width, 1, device=device)
    for b, (s, k) in enumerate(zip(seqs, skip)):
        edit_mask[b, s.lookup - k] = 1.0
    rows, cols, labels, owner = [], [], [], []
    for b, s in enumerate(rewrite):
        for j in range(s.tgt_len):
            rows.append(b)
            cols.append(s.tgt_start + j - 1 - skip[b])  # the position predicting token j
            labels.append(s.labels[j])
            owner.append(b)
    rows.append(len(seqs) - 1)
    cols.append(essence.kl_pos - skip[-1])
    return edit_mask, _Reads(torch.tensor(rows, device=device), torch.tensor(cols, device=device),
                             torch.tensor(labels, device=device), torch.tensor(owner, device=device),
                             torch.tensor([1.0 / rewrite[o].tgt_len for o in owner], device=device))


def _loss(logp: torch.Tensor, reads: _Reads, n_rewrite: int, kl_init: torch.Tensor, hp: RomeHparams,
          delta: torch.Tensor, init: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(each rewrite prompt's target NLL, their mean, the essence KL term, the total loss with
    the weight decay) from the log-probabilities at the read positions (the essence's last)."""
    tok_lp = logp[:-1].gather(1, reads.labels[:, None]).squeeze(1)
    per_prompt = torch.zeros(n_rewrite, device=logp.device).index_add(0, reads.owner, -tok_lp * reads.weights)
    nll = per_prompt.mean()
    kl = hp.kl_factor * F.kl_div(kl_init, logp[-1:], log_target=True, reduction="batchmean")
    wd = hp.v_weight_decay * delta.norm() / init.norm() ** 2
    return per_prompt, nll, kl, nll + kl + wd


def compute_value(model, st: RomeState, hp: RomeHparams, rewrite: list[Seq],
                  essence: Seq) -> tuple[torch.Tensor, dict]:
    """(v*, facts about the optimisation: steps taken, final loss terms, norms)."""
    layout = st.layout
    device = next(model.parameters()).device
    seqs = rewrite + [essence]
    # With the prefix cache, each row only runs its tokens after the context text.
    ids, mask, skip, extra, prefix = batch_inputs(model, st, seqs)
    keep = prefix.width if prefix is not None else None
    if hp.reuse_context_prefix:  # ... and, with this, only from the subject's last token on
        ids, mask, skip, extra, keep = cache_fixed_tokens(st, seqs, skip, prefix, device)
    width = ids.shape[1]

    edit_mask, reads = _positions(rewrite, essence, skip, width, device)
    n_rewrite = len(rewrite)

    loss_layer = hp.v_loss_layer if hp.v_loss_layer >= 0 else layout.num_layers + hp.v_loss_layer
    loss_layer = max(loss_layer, st.layer)
    use_final = loss_layer >= layout.num_layers - 1

    delta = torch.zeros(layout.hidden_size, device=device, requires_grad=True)
    state = {"init": None}

    def edit_hook(module, args, out):
        if state["init"] is None:
            state["init"] = out[0, seqs[0].lookup - skip[0]].detach().float().clone()
        return out + edit_mask.to(out.dtype) * delta.to(out.dtype)

    captured = {}

    def loss_layer_hook(module, args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    handles = [layout.layers[st.layer].mlp_out.register_forward_hook(edit_hook)]
    if not use_final:
        handles.append(layout.blocks[loss_layer].register_forward_hook(loss_layer_hook))
    kl_init = None
    steps = 0
    info = {}
    try:
        with torch.enable_grad():
            for step in range(hp.v_num_grad_steps):
                opt.zero_grad()
                out = forward(st, ids, mask, extra, keep)
                if use_final:
                    hidden = out.last_hidden_state
                else:
                    hidden = captured["h"]
                    if layout.final_norm is not None:
                        hidden = layout.final_norm(hidden)
                logp = torch.log_softmax(output_logits(model, hidden[reads.rows, reads.cols]).float(), -1)
                if kl_init is None:
                    kl_init = logp[-1:].detach().clone()
                per_prompt, nll, kl, loss = _loss(logp, reads, n_rewrite, kl_init, hp, delta, state["init"])
                info = {"loss": loss.item(), "nll": nll.item(), "kl": kl.item(),
                        "target_prob": torch.exp(-per_prompt).mean().item()}
                if hp.v_stop_rule == "loss":
                    # ROME's loop: stop on the total loss; the last iteration only evaluates.
                    if loss.item() < hp.v_stop_threshold or step == hp.v_num_grad_steps - 1:
                        break
                elif nll.item() < hp.v_stop_threshold:
                    break
                loss.backward()
                opt.step()
                steps = step + 1
                max_norm = hp.clamp_norm_factor * state["init"].norm()
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    finally:
        for h in handles:
            h.remove()
        if prefix is not None:
            crop(prefix.cache, prefix.width)  # leave the shared context cache as it was
    info.update(steps=steps, prefix_reused=prefix is not None, delta_norm=delta.norm().item(),
                value_norm=state["init"].norm().item())
    return state["init"] + delta.detach(), info
