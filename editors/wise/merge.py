"""Merging shards of the side memory: EasyEdit's GTA family (`easyeditor/models/wise/merge/gta.py`),
TIES-Merging (Yadav et al., NeurIPS 2023) by default.

Everything works on task vectors: each shard's side weight minus the main weight (the side memory
stores them so). For tensors delta_1..delta_n with weights w_1..w_n:

1. sparsify (trim): keep each delta's int(density * size) largest magnitudes, zero the rest
   ("magnitude"); DARE drops entries at random instead, rescaled by 1/density or not;
2. weight: w_i * delta_i;
3. consensus ("sum", TIES's sign election): per entry the sign of the sum of the weighted deltas
   (>= 0 counts as +); only entries agreeing with it are kept;
4. disjoint mean (normalize): the kept weighted sum divided by the sum of the weights of the kept
   entries (1 where none is kept); without normalize the plain weighted sum.

The merged weight is main + the result. `METHODS` names the configurations of EasyEdit's
merge_dict: ties = magnitude + sum + normalize, magnitude_norm, magnitude, sign, dare_ties,
dare_linear.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Gta(NamedTuple):
    sparsify: str | None  # "magnitude", "rescaled_random", "random" or None
    consensus: str | None  # "sum" or None
    normalize: bool


METHODS = {
    "ties": Gta("magnitude", "sum", True),
    "magnitude_norm": Gta("magnitude", None, True),
    "magnitude": Gta("magnitude", None, False),
    "sign": Gta(None, "sum", True),
    "dare_ties": Gta("rescaled_random", "sum", False),
    "dare_linear": Gta("random", None, False),
}


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density * size) largest-magnitude entries set to zero."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a tensor of {delta.numel()}")
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(delta.abs().reshape(-1).float(), k=k, largest=True).indices] = 1
    return delta * keep.reshape(delta.shape)


def drop_random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (divided by it when `rescale`)."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
    out = delta * keep.to(delta.device, delta.dtype)
    return out / density if rescale else out


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """Per entry, whether each weighted delta (stacked on dim 0) has the elected sign: the sign of
    their sum, 0 counting as +. Zero entries never agree."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


def merge_deltas(deltas: list[torch.Tensor], weights: list[float], method: str = "ties", density: float = 0.53,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The merged task vector of `deltas` (same shape) with `weights`, by `method` of METHODS."""
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"{len(deltas)} deltas and {len(weights)} weights")
    gta = METHODS[method]
    if gta.sparsify == "magnitude":
        deltas = [trim_magnitude(d, density) for d in deltas]
    elif gta.sparsify is not None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        deltas = [drop_random(d, density, gta.sparsify == "rescaled_random", gen) for d in deltas]
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * w
    if gta.consensus == "sum":
        agree = sign_consensus(weighted).to(stacked.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if gta.normalize else mixed


def merge_shards(shards: list[torch.Tensor], merged: torch.Tensor | None, method: str, density: float,
                 weight: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """EasyEdit's `merge_weight` (WISE-Merge): the stored shards merged with weights
    weight / n each when nothing was merged before; otherwise with the earlier merge as one more
    tensor, at weights 0.4 / n for the shards and 0.6 for the earlier merge (its fixed values)."""
    n = len(shards)
    if merged is None:
        return merge_deltas(list(shards), [weight / n] * n, method, density, generator)
    return merge_deltas(list(shards) + [merged], [0.4 / n] * n + [0.6], method, density, generator)
