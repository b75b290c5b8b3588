"""Training one edit into the open shard of the side memory (EasyEdit's `WISE.edit`).

The loss is the published one: the target's negative log-likelihood on the edit rows (mean over
each row's target tokens, then over rows) plus the activation-margin routing loss of the paper
(Eq. 5; EasyEdit's `__cal_activation_loss`), with s the activation scores of edited inputs and
s' those of irrelevant ones:

    mean+(s' - s + gamma)  +  mean+(s' - alpha)  +  mean+(beta - s)

where mean+ is the mean over the positive entries (0 when none is). Since the router reads the
running mean of the scores up to each position (router.py), s are the running means at the
positions the target is read from, on every edit row, and s' the running means at every real
position of the irrelevant rows.

Plain SGD (EasyEdit: torch.optim.SGD with weight decay 1e-5 on the side weight) on the shard's
task vector, the gradient multiplied by the shard's mask; the side weight kept within
norm_constraint of the main weight; EasyEdit's early stop (the last two losses within
stop_delta, the last below stop_loss). The blocks below the side memory's are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editors.frozen_prefix import frozen_prefix
from editors.vocab_loss import token_nll
from editors.wise.inputs import EditBatch
from editors.wise.router import Router, prefix_means


def _mean_positive(values: torch.Tensor) -> torch.Tensor:
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def routing_loss(inside: torch.Tensor, outside: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The margin loss on edited scores `inside` and irrelevant scores `outside` (1-D)."""
    loss = _mean_positive(beta - inside)
    if outside.numel():
        loss = loss + _mean_positive(outside[:, None] - inside[None, :] + gamma) + _mean_positive(outside - alpha)
    return loss


@dataclass
class Trained:
    delta: torch.Tensor  # the shard's task vector after the edit
    steps: int
    nll: float  # final target NLL (mean over edit rows)
    act_loss: float  # final routing loss
    inside: float  # final mean activation score of the edited positions (the router's statistic)
    outside: float | None  # final largest activation score of the irrelevant positions
    loss_start: float | None


def _losses(model, batch: EditBatch, router: Router, hp) -> tuple[torch.Tensor, ...]:
    """(target NLL, routing loss, edited scores, irrelevant scores) of one forward pass."""
    hidden = model.base_model(**batch.inputs, use_cache=False).last_hidden_state
    nll = token_nll(model, hidden[batch.read_rows, batch.read_cols], batch.targets).float()
    per_row = torch.zeros(batch.n_edit, device=nll.device).index_add(0, batch.read_rows, nll)
    per_row = per_row / torch.bincount(batch.read_rows, minlength=batch.n_edit).float()
    means, _, _ = prefix_means(router.kept["tokens"], batch.mask)
    inside = means[batch.read_rows, batch.read_cols]
    outside = means[batch.out_positions]
    return per_row.mean(), routing_loss(inside, outside, hp.alpha, hp.beta, hp.gamma), inside, outside


def train_edit(model, layout, layer: int, router: Router, batch: EditBatch, start: torch.Tensor,
               mask: torch.Tensor, main_weight: torch.Tensor, hp) -> Trained:
    """SGD on a copy of the task vector `start` (float32, (out, in)) under `mask`; `main_weight`
    is the projection's weight (out, in), for the weight decay of the side weight."""
    delta = start.clone().requires_grad_(True)
    keep = mask.to(delta.dtype)
    losses: list[float] = []
    steps = 0
    router.train_delta = delta
    try:
        with frozen_prefix(model, layout, layer, **batch.inputs):
            with torch.enable_grad():
                for _ in range(hp.steps):
                    if len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= hp.stop_delta \
                            and losses[-1] <= hp.stop_loss:
                        break
                    nll, act, _, _ = _losses(model, batch, router, hp)
                    loss = nll + act
                    delta.grad = None
                    loss.backward()
                    with torch.no_grad():
                        grad = delta.grad * keep
                        if hp.weight_decay:
                            grad += hp.weight_decay * (main_weight.float() + delta) * keep
                        delta -= hp.lr * grad
                        if hp.norm_constraint:
                            delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
                    losses.append(loss.item())
                    steps += 1
            with torch.no_grad():
                nll, act, inside, outside = _losses(model, batch, router, hp)
    finally:
        router.train_delta = None
        router.kept.clear()
    return Trained(delta=delta.detach(), steps=steps, nll=nll.item(), act_loss=act.item(),
                   inside=inside.mean().item(), outside=outside.max().item() if outside.numel() else None,
                   loss_start=losses[0] if losses else None)
