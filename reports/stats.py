"""The paired comparison of a run with the baseline over their shared cases: a sign-flip
permutation test and a bootstrap interval of the mean difference (the core's one bootstrap)."""

from __future__ import annotations

import math

import numpy as np

from bench.core.metrics import bootstrap_ci

ALPHA = 0.05  # significance level of the ▲ / ▼ marks
N_PERMUTATIONS = 10_000  # Monte-Carlo sign flips when exact enumeration is too big
EXACT_MAX_N = 16  # up to 2**16 sign patterns are enumerated exactly


def signflip_pvalue(d: np.ndarray, n_resamples: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation test of mean(d) == 0.

    Zero differences do not change |sum(s * d)| under any sign pattern, so they are dropped first.
    Exact (all 2**n sign patterns of the non-zero differences) for n <= 16, else Monte Carlo with
    the +1 correction."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan")
    d = d[np.abs(d) > 1e-12]
    n = len(d)
    obs = abs(d.sum())
    if n == 0 or obs <= 1e-12:
        return 1.0
    thresh = obs * (1 - 1e-9)
    if n <= EXACT_MAX_N:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
        return float(np.mean(np.abs(signs @ d) >= thresh))
    rng = np.random.default_rng(seed)
    total, count, done = d.sum(), 0, 0
    chunk = max(1, min(n_resamples, 8_000_000 // n))
    while done < n_resamples:
        k = min(chunk, n_resamples - done)
        # bit b = 1 keeps the sign, 0 flips it: sum(s * d) = 2 * (bits @ d) - sum(d)
        bits = np.unpackbits(rng.integers(0, 256, size=(k, (n + 7) // 8), dtype=np.uint8), axis=1)[:, :n]
        stat = np.abs(2.0 * (bits.astype(np.float32) @ d.astype(np.float32)) - total)
        count += int(np.count_nonzero(stat >= thresh - 1e-4 * max(1.0, obs)))
        done += k
    return (count + 1) / (n_resamples + 1)


def significance_mark(diff: float | None, p: float | None) -> str:
    """▲ significantly better, ▼ significantly worse, · not significant (or not computable)."""
    if diff is None or p is None or math.isnan(p) or p >= ALPHA or diff == 0:
        return "·"
    return "▲" if diff > 0 else "▼"


def paired_comparison(scores: np.ndarray, base_scores: np.ndarray) -> dict:
    """A run's case scores (fractions) against the baseline's on the same cases, in points:
    {'diff', 'p', 'lo', 'hi', 'n', 'editor_mean', 'base_mean', 'mark'}."""
    d = np.asarray(scores, dtype=float) - np.asarray(base_scores, dtype=float)
    p = signflip_pvalue(d)
    lo, hi = bootstrap_ci(d)
    diff = float(d.mean()) * 100
    return {"diff": diff, "p": p, "lo": lo * 100, "hi": hi * 100, "n": len(d),
            "editor_mean": float(np.mean(scores)) * 100, "base_mean": float(np.mean(base_scores)) * 100,
            "mark": significance_mark(diff, p)}
