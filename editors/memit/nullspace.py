"""AlphaEdit's null-space projector of one layer: P = U U^T over the eigenvectors U of the key
second moment C whose eigenvalues fall below the threshold, i.e. the directions ordinary text's
keys (almost) never take; an update D P leaves the layer's output unchanged for keys outside
them.

P is computed once per (model, layer, statistics, threshold) and cached as safetensors under
`<cache_dir>/nullspace/`, named after the statistics file it comes from
(editors/rome/layer_stats.py) plus the threshold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editors.rome.layer_stats import KeyStats


@dataclass
class Projector:
    layer: int
    matrix: torch.Tensor  # (in, in) float32
    dim: int  # dimension of the null space (rank of P)
    path: Path | None
    loaded: bool


def null_projector(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, null-space dimension): eigh of C in float64 (C is symmetric positive semi-definite,
    where the reference code takes an SVD: the same vectors)."""
    values, vectors = torch.linalg.eigh(mom2.double())
    small = vectors[:, values < threshold]
    return (small @ small.T).float(), int(small.shape[1])


def projectors(stats: dict[int, KeyStats], threshold: float, cache_dir: Path | None) -> dict[int, Projector]:
    """One projector per layer of `stats`, read from the cache next to the statistics where
    present, else computed (and cached when the statistics are)."""
    out = {}
    folder = Path(cache_dir) / "nullspace" if cache_dir is not None else None
    for layer, st in stats.items():
        path = None
        if folder is not None and st.path is not None:
            path = folder / f"{st.path.stem}-null{threshold:g}.safetensors"
            if path.exists():
                with safe_open(str(path), framework="pt") as f:
                    dim = int((f.metadata() or {}).get("dim", -1))
                out[layer] = Projector(layer, load_file(str(path))["projector"], dim, path, True)
                continue
        matrix, dim = null_projector(st.mom2, threshold)
        if path is not None:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({"projector": matrix.contiguous()}, str(tmp),
                      metadata={"stats": st.path.name, "layer": str(layer), "threshold": repr(threshold),
                                "dim": str(dim)})
            tmp.replace(path)
        out[layer] = Projector(layer, matrix, dim, path, False)
    return out
