"""The least-squares updates of MEMIT and AlphaEdit for one layer, in float64.

Notation: K (n, d) the cases' keys at the layer, one per row; R (n, h) the residuals to write;
the update D (h, d) is added to the projection's (out, in) weight.

MEMIT:      D = R^T K (lambda C + K^T K)^-1
AlphaEdit:  D = R^T K P (K^T K P + K_p^T K_p P + l2 I)^-1
            (the reference code solves (P (K^T K + K_p^T K_p) + l2 I) X = P K^T R and takes X^T;
            with P and K_p^T K_p symmetric that is the line above)

Both are computed with the push-through identity (B + U V)^-1 U = B^-1 U (I + V B^-1 U)^-1 from a
d x d inverse B^-1 that does not depend on the cases (MEMIT: (lambda C)^-1, once per run;
AlphaEdit: (l2 I + P K_p^T K_p)^-1, once per sequential state), so a call costs O(n d^2) instead
of a d x d solve per call: the same update, and cheap for a single edit.
"""

from __future__ import annotations

import torch

from editors.rome.layer_stats import inverse_float64


def memit_update(keys: torch.Tensor, resid: torch.Tensor, scaled_c_inv: torch.Tensor) -> torch.Tensor:
    """D = R^T K (lambda C + K^T K)^-1 given M = (lambda C)^-1: D = R^T (I + K M K^T)^-1 K M."""
    k, r = keys.double(), resid.double()
    km = k @ scaled_c_inv  # (n, d); M is symmetric
    s = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) + km @ k.T
    return r.T @ torch.linalg.solve(s, km)


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor,
                     base_inv: torch.Tensor) -> torch.Tensor:
    """D = X^T with X = (P (K^T K + K_p^T K_p) + l2 I)^-1 P K^T R, given
    B^-1 = (l2 I + P K_p^T K_p)^-1: X = B^-1 U (I + K B^-1 U)^-1 R with U = P K^T."""
    k, r, p = keys.double(), resid.double(), projector.double()
    bu = base_inv @ (p @ k.T)  # (d, n)
    s = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) + k @ bu
    return (bu @ torch.linalg.solve(s, r)).T


def alphaedit_base_inverse(projector: torch.Tensor, preserved: torch.Tensor | None, l2: float) -> torch.Tensor:
    """(l2 I + P K_p^T K_p)^-1 in float64 (I / l2 without earlier edits)."""
    d = projector.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=projector.device)
    if preserved is None:
        return eye / l2
    return torch.linalg.solve(l2 * eye + projector.double() @ preserved.double(), eye)


def scaled_inverse(mom2: torch.Tensor, weight: float) -> torch.Tensor:
    """(weight * C)^-1 in float64 (pseudo-inverse when C is singular)."""
    return inverse_float64(weight * mom2.double())
