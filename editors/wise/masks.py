"""Knowledge sharding: the random gradient mask each shard of the side memory trains under.

WISE stores the edits of one shard in a random subspace of the side memory: a mask M_i with a
fraction `mask_ratio` of the entries set, drawn when the shard starts, multiplies every gradient
of the shard's edits. EasyEdit draws each entry independently (`generate_activation_mask`:
Bernoulli(mask_ratio)), so two shards overlap in about mask_ratio^2 of the entries; its
alternative (`generate_non_overlapping_mask`) draws exactly int(mask_ratio * n) entries among
those no earlier shard used. Both are here, seeded by (seed, shard index) so that a resumed run
draws the masks an uninterrupted one draws.
"""

from __future__ import annotations

import torch

from bench.core.errors import BenchError


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The generator of shard `shard`'s mask (and of its DARE merge): one stream per (seed, shard)."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + shard)


def random_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry set independently with probability `ratio` (EasyEdit's default sharding)."""
    return torch.rand(shape, generator=generator) < ratio


def disjoint_mask(shape: tuple[int, ...], ratio: float, used: torch.Tensor | None,
                  generator: torch.Generator) -> torch.Tensor:
    """Exactly int(ratio * n) entries, drawn uniformly among those not in `used` (the union of
    the earlier shards' masks); BenchError when too few are left."""
    n = 1
    for d in shape:
        n *= d
    size = int(ratio * n)
    free = torch.arange(n) if used is None else (~used.reshape(-1).cpu()).nonzero().reshape(-1)
    if free.numel() < size:
        raise BenchError(f"wise: disjoint_masks: {free.numel()} unused entries left, a shard needs {size} "
                         f"(mask_ratio {ratio}); use fewer shards or disjoint_masks=false")
    chosen = free[torch.randperm(free.numel(), generator=generator)[:size]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(shape)


def shard_mask(shape: tuple[int, ...], ratio: float, seed: int, shard: int, *, disjoint: bool = False,
               used: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The mask of shard number `shard` (0, 1, ...), on `device`."""
    gen = shard_generator(seed, shard)
    mask = disjoint_mask(shape, ratio, used, gen) if disjoint else random_mask(shape, ratio, gen)
    return mask.to(device)
