"""WISE's side memory: a copy of one MLP output projection that holds the edits, in shards.

The main memory is the projection itself (W, never written). The side memory is kept as task
vectors relative to it, float32, (out, in) whatever the projection's storage:

* `shard`: the shard being written (side weight W + shard); its entries outside `mask` stay 0;
* `mask`: the current shard's random gradient mask (masks.py);
* `stored`: shards closed every `save_freq` edits, waiting for the merge;
* `merged`: the merge of the earlier shards (merge.py), every `merge_freq` edits (W + merged is
  EasyEdit's `layer.weight`; 0 before the first merge);
* the router's statistics: the smallest end-of-training activation score of any edit
  (`min_act`; threshold = act_ratio * min_act), and their sum and count.

`deployed()` is what evaluation reads: EasyEdit evaluates a sequence of edits after a final
merge (`WISE.__call__`: the open shard is stored and every stored shard merged once the edit
count reaches save_freq), computed here without changing the memory, so that editing can go on
after a checkpoint exactly as if it had not been read.

`SideMemory` is the module put into the model next to the projection (`<mlp>.wise_memory`): it
carries the state and the router (router.py). The state is a plain object, so the tree snapshot
of an edit handle keeps it by reference and an edit's own undo record (`snapshot` / `restore`)
puts its values back: only the entries the edit trains (its shard's masked entries) are copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from editors.wise.masks import shard_generator, shard_mask
from editors.wise.merge import merge_shards

SCALARS = ("count", "shards", "merges", "min_act", "act_sum", "act_count")


class WiseState:
    """The side memory's tensors and counters (see the module docstring)."""

    def __init__(self, shape: tuple[int, int], device: torch.device | str):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.shard = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        self.mask = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        self.merged: torch.Tensor | None = None
        self.stored: list[torch.Tensor] = []
        self.used: torch.Tensor | None = None  # union of the masks drawn (disjoint masks)
        self.count = 0  # edits written
        self.shards = 0  # masks drawn
        self.merges = 0
        self.min_act: float | None = None
        self.act_sum = 0.0
        self.act_count = 0
        self.version = 0  # bumped on every change: the deployed view is cached per version
        self._deployed: tuple[int, Any] | None = None

    # ---------------------------------------------------------------------------------------
    # The router's threshold and the view evaluation reads
    # ---------------------------------------------------------------------------------------

    def threshold(self, act_ratio: float) -> float:
        return math.inf if self.min_act is None else self.min_act * act_ratio

    def deployed(self, hp) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(merged, shard) task vectors as evaluation reads them (None: nothing there, the side
        weight equals the main one): once `count` reaches save_freq, every stored shard and the
        open one merged (EasyEdit's final merge), else the memory as it is."""
        if self._deployed is not None and self._deployed[0] == self.version:
            return self._deployed[1]
        merged = self.merged
        shard = self.shard if bool(self.shard.any()) else None
        if self.count >= hp.save_freq:
            pending = self.stored + ([shard] if shard is not None else [])
            if pending:
                gen = shard_generator(hp.seed, 1_000_000 + self.merges)
                merged = merge_shards(pending, self.merged, hp.merge_alg, hp.densities, hp.merge_weight, gen)
            shard = None
        view = (merged, shard)
        self._deployed = (self.version, view)
        return view

    # ---------------------------------------------------------------------------------------
    # Writing edits: a shard's mask, the statistics, closing and merging shards
    # ---------------------------------------------------------------------------------------

    def next_mask(self, hp) -> torch.Tensor:
        """The mask the next edit trains under: the current one, or a new shard's (drawn, not set)."""
        if self.count % hp.save_freq:
            return self.mask
        return shard_mask(self.shape, hp.mask_ratio, hp.seed, self.shards, disjoint=hp.disjoint_masks,
                          used=self.used, device=self.device)

    def open_shard(self, mask: torch.Tensor) -> None:
        """Start a new shard under `mask` (its entries of `shard` are zero: a fresh shard)."""
        self.mask = mask
        self.shards += 1
        self.used = mask.clone() if self.used is None else (self.used | mask)
        self.version += 1

    def record(self, act: float) -> None:
        """One edit's end-of-training activation score (EasyEdit's EditingMeanAct)."""
        self.min_act = act if self.min_act is None else min(self.min_act, act)
        self.act_sum += act
        self.act_count += 1
        self.version += 1

    def finish_edit(self, hp) -> dict[str, bool]:
        """Count the edit; close the shard every save_freq edits, merge every merge_freq."""
        self.count += 1
        saved = merged = False
        if self.count % hp.save_freq == 0:
            self.stored = self.stored + [self.shard]
            self.shard = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
            saved = True
        if self.count % hp.merge_freq == 0 and self.stored:
            gen = shard_generator(hp.seed, 1_000_000 + self.merges)
            self.merged = merge_shards(self.stored, self.merged, hp.merge_alg, hp.densities, hp.merge_weight, gen)
            self.merges += 1
            self.stored = []
            merged = True
        self.version += 1
        return {"saved": saved, "merged": merged}

    # ---------------------------------------------------------------------------------------
    # One edit's undo record
    # ---------------------------------------------------------------------------------------

    def snapshot(self, mask: torch.Tensor) -> dict[str, Any]:
        """What `restore` needs to undo the next edit, which trains `shard` under `mask` and may
        replace (never change in place) mask, stored, merged and used: references to those, the
        counters, and a copy of the shard's entries under `mask` (on the CPU)."""
        return {"shard": self.shard, "mask": self.mask, "merged": self.merged, "stored": list(self.stored),
                "used": self.used, "train_mask": mask, "values": self.shard[mask].cpu(),
                **{k: getattr(self, k) for k in SCALARS}}

    @torch.no_grad()
    def restore(self, snap: dict[str, Any]) -> None:
        for key in ("shard", "mask", "merged", "stored", "used", *SCALARS):
            setattr(self, key, snap[key])
        self.shard[snap["train_mask"]] = snap["values"].to(self.device)
        self.version += 1

    # ---------------------------------------------------------------------------------------
    # Sequential state: tensors and JSON values
    # ---------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"shard": self.shard, "mask": self.mask}
        if self.merged is not None:
            out["merged"] = self.merged
        if self.used is not None:
            out["used"] = self.used
        out.update({f"stored.{i}": t for i, t in enumerate(self.stored)})
        return {k: v.detach().clone() for k, v in out.items()}

    def values(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in SCALARS}, "stored": len(self.stored), "shape": list(self.shape)}

    def load(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        def get(name: str, dtype: torch.dtype) -> torch.Tensor:
            t = tensors[name]
            if tuple(t.shape) != self.shape:
                raise ValueError(f"saved {name} has shape {tuple(t.shape)}, the projection {self.shape}")
            return t.to(self.device, dtype).clone()

        self.shard, self.mask = get("shard", torch.float32), get("mask", torch.bool)
        self.merged = get("merged", torch.float32) if "merged" in tensors else None
        self.used = get("used", torch.bool) if "used" in tensors else None
        self.stored = [get(f"stored.{i}", torch.float32) for i in range(int(values["stored"]))]
        for key in SCALARS:
            setattr(self, key, values[key])
        self.version += 1


class SideMemory(nn.Module):
    """The side memory in the model's module tree (`<mlp>.wise_memory`): its state and router.
    It has no parameters or buffers of its own: the edits live in `state` (float32 task vectors
    of the projection, read by the router's hook)."""

    def __init__(self, state: WiseState, router, layer: int):
        super().__init__()
        self.state = state
        self.router = router
        self.layer = layer

    def extra_repr(self) -> str:
        st = self.state
        return (f"layer={self.layer}, shape={st.shape}, edits={st.count}, shards={st.shards}, "
                f"stored={len(st.stored)}, merges={st.merges}")
