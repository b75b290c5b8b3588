"""The `alphaedit` editor: MEMIT's machinery with the update projected onto the null space of the
preserved keys, plus, in sequential mode, the keys of earlier edits kept as further constraints."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from editors.memit.editor import BatchHandle, Memit, MemitState
from editors.memit.hparams import AlphaEditHparams
from editors.memit.keys import read_layers
from editors.memit.nullspace import projectors
from editors.memit.rows import CaseRows
from editors.memit.solve import alphaedit_base_inverse, alphaedit_update

_STATE_KEY = re.compile(r"preserved\.(\d+)")


class AlphaEdit(Memit):
    """`alphaedit`: AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected by P, the
    projector onto the null space of each layer's key second moment C, so that the outputs for
    keys of ordinary text stay as they were; in sequential mode the keys of earlier edits
    (K_p K_p^T, accumulated by `apply_batch`) are kept too (docs/memit.md)."""

    name = "alphaedit"
    Hparams = AlphaEditHparams

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._preserved: dict[int, torch.Tensor] = {}  # layer -> sum of K^T K of earlier edits (float64)
        self._base_inv: dict[int, torch.Tensor] = {}  # layer -> (l2 I + P K_p^T K_p)^-1 for _preserved

    def _prepare_solver(self, st: MemitState, cache_dir: Path | None, info: dict) -> None:
        """P per layer, from the disk cache when computed before."""
        device = next(st.layout.blocks.parameters()).device
        found = projectors(st.stats, self.hparams.nullspace_threshold, cache_dir)
        st.solver = {layer: p.matrix.to(device) for layer, p in found.items()}
        info.update(nullspace_threshold=self.hparams.nullspace_threshold,
                    nullspace_dim={str(layer): p.dim for layer, p in found.items()},
                    nullspace_cache=[str(p.path) if p.path else None for p in found.values()],
                    nullspace_loaded_from_cache=all(p.loaded for p in found.values()))
        self._base_inv = {}

    def _update(self, st: MemitState, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        if layer not in self._base_inv:
            preserved = self._preserved.get(layer)
            projector = st.solver[layer]
            self._base_inv[layer] = alphaedit_base_inverse(
                projector, preserved.to(projector.device) if preserved is not None else None, self.hparams.l2)
        return alphaedit_update(keys, resid, st.solver[layer], self._base_inv[layer])

    def _after_batch(self, model, st: MemitState, rows: CaseRows, handle: BatchHandle) -> float:
        """The batch's keys at every edited layer, read on the model they were written into, join
        the preserved keys; the handle puts the previous state back when restored."""
        t0 = time.perf_counter()
        keys, _, _ = read_layers(model, st.layout, rows, st.layers, st.weights)
        before = dict(self._preserved)
        grown = {}
        for layer in st.layers:
            k = keys[layer].double().cpu()
            old = self._preserved.get(layer)
            grown[layer] = k.T @ k if old is None else old + k.T @ k  # a new tensor: `before` stays intact
        self._set_state(grown)
        handle.undo.append(lambda: self._set_state(before))
        return time.perf_counter() - t0

    def _set_state(self, preserved: dict[int, torch.Tensor]) -> None:
        self._preserved = dict(preserved)
        self._base_inv = {}

    def sequential_state(self) -> dict[str, torch.Tensor]:
        return {f"preserved.{layer}": t.detach().cpu().contiguous() for layer, t in sorted(self._preserved.items())}

    def load_sequential_state(self, state: dict[str, torch.Tensor]) -> None:
        preserved = {}
        for key, tensor in state.items():
            m = _STATE_KEY.fullmatch(key)
            if m is None or int(m.group(1)) not in self.hparams.layers:
                raise ValueError(f"{self.name}: unexpected sequential state entry {key!r} "
                                 f"(expected preserved.<layer> for layers {self.hparams.layers})")
            if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
                raise ValueError(f"{self.name}: sequential state {key!r} is not a square matrix")
            preserved[int(m.group(1))] = tensor.detach().to(torch.float64).cpu()
        self._set_state(preserved)
