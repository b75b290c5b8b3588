"""GRACE's codebook: keys, values, deferral radii and the answer each entry was trained for, with
the published rules for placing an edit's key (Hartvigsen et al., 2023, Algorithm 1; the
authors' `GRACEAdapter.forward` and EasyEdit's copy of it).

An edit brings a key k (the wrapped projection's input at the edit prompt's last token) and an
answer y. With d the Euclidean distance from k to its nearest entry i (key K_i, radius eps_i,
answer y_i) and eps0 the initial radius:

  * empty codebook, or d > eps0 + eps_i (the new ball would not touch entry i's): **add**
    (k, fresh value, eps0, y);
  * y == y_i and d > eps_i: **expand** entry i to cover k: eps_i = d (`coverage`); with
    `moving_average` the key also moves halfway, K_i = (K_i + k) / 2, and eps_i = d (the
    reference's rule, which measures d from the old key);
  * y == y_i and d <= eps_i: k is already covered (**kept**); entry i's value trains on the edit;
  * y != y_i: **split**: add (k, fresh value, min(eps0, d/2), y) and shrink entry i to
    min(eps_i, d/2 - SPLIT_MARGIN), so that the two balls no longer overlap (the reference sets
    eps_i = d/2 - 1e-5 and the new radius to d/2 unconditionally, which can *grow* a radius a
    previous split shrank: here a split only shrinks);
  * y != y_i and d <= 2 * SPLIT_MARGIN: the same key with another answer. The reference's split
    would give entry i a negative radius (dead) and the new entry one of at most 1e-5, below the
    rounding noise of batched activations; here the later edit **overwrites** entry i (its
    answer and a fresh value; key and radius kept).

Only the nearest entry is considered, as in the reference. The edit's entry (the added one, or
entry i) is the one whose value is then trained.

Storage grows by doubling; every change an edit makes is recorded in a `Change` that `undo`
reverts exactly (rows written in place are saved first), so a sequential run keeps one undo
record per edit, not one copy of the codebook per edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SPLIT_MARGIN = 1e-5  # the reference's: after a split the older radius ends this short of d/2
# An input is covered when its distance to the nearest key is at most radius * (1 + RADIUS_TOL):
# an expanded radius equals the distance of the input that expanded it, which batched or padded
# forward passes reproduce only up to rounding (about 1e-5 of the activations' norm on CPU).
RADIUS_TOL = 1e-3
ACTIONS = ("added", "expanded", "kept", "split", "overwritten")

Row = tuple[torch.Tensor, torch.Tensor, float, tuple[int, ...]]


@dataclass
class Change:
    """What one edit did to the codebook: `action` (ACTIONS), `entry` (whose value trains),
    the nearest entry and its distance before the edit (None for an empty codebook), the size
    before, and the rows it changed in place, as they were."""

    action: str
    entry: int
    nearest: int | None
    distance: float | None
    size_before: int
    saved: dict[int, Row] = field(default_factory=dict)


class Codebook:
    """Keys (float32), values (float32), radii (float64) and answers (token ids) of `size`
    entries; rows past `size` are spare capacity."""

    def __init__(self, key_dim: int, value_dim: int, device: torch.device | str | None = None):
        self.keys = torch.zeros((0, key_dim), dtype=torch.float32, device=device)
        self.values = torch.zeros((0, value_dim), dtype=torch.float32, device=device)
        self.radii = torch.zeros(0, dtype=torch.float64, device=device)
        self.labels: list[tuple[int, ...]] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def key_dim(self) -> int:
        return self.keys.shape[1]

    @property
    def value_dim(self) -> int:
        return self.values.shape[1]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    # ----------------------------------------------------------------------------------------
    # Lookup
    # ----------------------------------------------------------------------------------------

    def distances(self, queries: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """(N, size) Euclidean distances, in float64, from queries (..., key_dim). `exact`
        subtracts the vectors (the rules: a boundary decided bit for bit); otherwise the
        matrix-product form (the lookup over every position: fast, within ~1e-7)."""
        q = queries.reshape(-1, self.key_dim).to(self.device, torch.float64)
        mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
        return torch.cdist(q, self.keys[: self.size].double(), compute_mode=mode)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(covered, nearest entry) per query row: covered when within the nearest entry's
        radius (RADIUS_TOL). The codebook must not be empty."""
        dist, index = self.distances(queries).min(dim=1)
        return dist <= self.radii[index] * (1 + RADIUS_TOL), index

    # ----------------------------------------------------------------------------------------
    # The rules
    # ----------------------------------------------------------------------------------------

    def update(self, key: torch.Tensor, label: tuple[int, ...], eps: float, expand: str,
               init: Callable[[int], torch.Tensor]) -> Change:
        """Place an edit's key with answer `label` by the rules (module docstring); `init(i)`
        gives the fresh value of entry i when one is added or overwritten."""
        key = key.reshape(-1).to(self.device, torch.float32)
        label = tuple(int(t) for t in label)
        if self.size == 0:
            return self._add(key, label, eps, init, None, None)
        d_all = self.distances(key, exact=True)[0]
        i = int(d_all.argmin())
        d, r_i = float(d_all[i]), float(self.radii[i])
        if d > eps + r_i:
            return self._add(key, label, eps, init, i, d)
        saved = {i: self._row(i)}
        if self.labels[i] != label:
            if d / 2 - SPLIT_MARGIN <= 0:
                self.values[i] = init(i).to(self.values)
                self.labels[i] = label
                return Change("overwritten", i, i, d, self.size, saved)
            change = self._add(key, label, min(eps, d / 2), init, i, d)
            self.radii[i] = min(r_i, d / 2 - SPLIT_MARGIN)
            change.action, change.saved = "split", saved
            return change
        if d <= r_i:
            return Change("kept", i, i, d, self.size, saved)
        if expand == "moving_average":
            self.keys[i] = (self.keys[i] + key) / 2
        elif expand != "coverage":
            raise ValueError(f"unknown eps_expand {expand!r}")
        self.radii[i] = d
        return Change("expanded", i, i, d, self.size, saved)

    def _add(self, key, label, radius: float, init, nearest, distance) -> Change:
        n = self.size
        self._reserve(n + 1)
        self.keys[n] = key
        self.values[n] = init(n).to(self.values)
        self.radii[n] = radius
        self.labels.append(label)
        self.size = n + 1
        return Change("added", n, nearest, distance, n)

    def _row(self, i: int) -> Row:
        return self.keys[i].clone(), self.values[i].clone(), float(self.radii[i]), self.labels[i]

    def _reserve(self, n: int) -> None:
        capacity = self.keys.shape[0]
        if n <= capacity:
            return
        grown = max(n, 2 * capacity, 8)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((grown, *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[:capacity] = t
            return out

        self.keys, self.values, self.radii = grow(self.keys), grow(self.values), grow(self.radii)

    def set_value(self, entry: int, value: torch.Tensor) -> None:
        """Entry `entry`'s value (the trained one); the edit's Change has saved the old one."""
        self.values[entry] = value.reshape(-1).to(self.values)

    def undo(self, change: Change) -> None:
        """The codebook exactly as it was before the edit that made `change` (undo the edits
        of a sequence last first)."""
        self.size = change.size_before
        del self.labels[change.size_before:]
        for i, (key, value, radius, label) in change.saved.items():
            self.keys[i], self.values[i], self.radii[i] = key, value, radius
            self.labels[i] = label

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """keys (size, key_dim), values (size, value_dim), radii (size,): copies."""
        n = self.size
        return {"keys": self.keys[:n].clone(), "values": self.values[:n].clone(), "radii": self.radii[:n].clone()}

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor,
                     labels: list, device: torch.device | str | None = None) -> Codebook:
        n = keys.shape[0]
        if keys.ndim != 2 or values.ndim != 2 or radii.shape != (n,) or values.shape[0] != n or len(labels) != n:
            raise ValueError(f"inconsistent codebook: keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                             f"radii {tuple(radii.shape)}, {len(labels)} answers")
        book = cls(keys.shape[1], values.shape[1], device)
        book._reserve(n)
        book.keys[:n] = keys.to(book.keys)
        book.values[:n] = values.to(book.values)
        book.radii[:n] = radii.to(book.radii)
        book.labels = [tuple(int(t) for t in label) for label in labels]
        book.size = n
        return book
