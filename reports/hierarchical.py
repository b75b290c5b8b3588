"""Statistics over training seeds: a cell of `bench holdout-matrix --seeds` rests on one trained
checkpoint per seed, each evaluated on the same cases, so it has two sources of variance, the
cases and the seed (docs/holdout.md, "Seeds").

The interval is a two-stage (hierarchical) paired bootstrap: each resample draws S seeds with
replacement from the S trained, and for each drawn seed the cases with replacement (the same case
indices for both editors of a paired comparison, fresh indices at every draw of a seed). The
statistic of a resample is the mean over the drawn seeds of the per-seed statistic (a mean, a
difference of means, a Score or a difference of Scores, each a function of that seed's column
means), so that its point value, the mean over seeds of the per-seed statistic, is what the cell
shows. With strata (the tasks of the multi-task column's average) one draw of seeds serves every
stratum (a seed's checkpoint is evaluated on all of them) and the cases are resampled within each
stratum; the statistic is the mean over strata.

The random draws, in order, from numpy.random.default_rng(seed): the seeds of every resample
(an (n_resamples, S) array of integers, not drawn when S = 1); then, for each stratum, each draw
slot k < S and each seed s in order, an (n_resamples, n_s) array of case indices. A resample uses
the case indices of slot k's draw for the seed drawn in slot k.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from bench.core.metrics import N_BOOTSTRAP
from reports.stats import MIN_PAIRS, difference, harmonic_mean, percentile_interval

# A statistic of one seed: its columns' means (one array per column, all of one length: the
# resamples, or length 1 for the point value) -> the statistic (an array of that length).
Statistic = Callable[[list[np.ndarray]], np.ndarray]


def mean_of(means: list[np.ndarray]) -> np.ndarray:
    """One column: its mean."""
    return np.asarray(means[0], dtype=float)


def mean_difference(means: list[np.ndarray]) -> np.ndarray:
    """Two columns (a, b): mean(a) - mean(b)."""
    return np.asarray(means[0], dtype=float) - np.asarray(means[1], dtype=float)


def score_of(means: list[np.ndarray]) -> np.ndarray:
    """The Score (harmonic mean) of the columns' means."""
    return np.asarray(harmonic_mean(means), dtype=float)


def score_difference(means: list[np.ndarray]) -> np.ndarray:
    """2k columns, a's terms then b's: Score(a) - Score(b)."""
    k = len(means) // 2
    return np.asarray(harmonic_mean(means[:k]), dtype=float) - np.asarray(harmonic_mean(means[k:]), dtype=float)


def shared_cases(strata: Sequence[Sequence[Sequence[np.ndarray]]]) -> int:
    """The cases a statistic rests on: per stratum the fewest of any seed, summed over strata."""
    return sum(min(len(cols[0]) for cols in stratum) for stratum in strata)


def per_seed_values(strata: Sequence[Sequence[Sequence[np.ndarray]]], stat: Statistic) -> list[float]:
    """The statistic of each seed (its full columns), averaged over the strata."""
    n_seeds = len(strata[0])
    return [float(np.mean([stat([np.array([np.mean(c)]) for c in stratum[s]])[0] for stratum in strata]))
            for s in range(n_seeds)]


def hierarchical_resamples(strata: Sequence[Sequence[Sequence[np.ndarray]]], stat: Statistic,
                           n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """The statistic of `n_resamples` two-stage resamples (seeds, then cases within each drawn
    seed and stratum). strata[t][s]: the columns of stratum t (a task) for seed s, arrays of
    one length n_ts (the cases; paired columns share their case order)."""
    n_seeds = len(strata[0])
    if any(len(stratum) != n_seeds for stratum in strata):
        raise ValueError("every stratum needs the same seeds")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, size=(n_resamples, n_seeds)) if n_seeds > 1 else \
        np.zeros((n_resamples, 1), dtype=int)
    total = np.zeros(n_resamples)
    for stratum in strata:
        for k in range(n_seeds):
            slot = np.empty(n_resamples)
            for s, columns in enumerate(stratum):
                cols = [np.asarray(c, dtype=float) for c in columns]
                n = len(cols[0])
                idx = rng.integers(0, n, size=(n_resamples, n))
                values = stat([c[idx].mean(axis=1) for c in cols])
                chosen = drawn[:, k] == s
                slot[chosen] = values[chosen]
            total += slot
    return total / (len(strata) * n_seeds)


def seeded_cell(strata: Sequence[Sequence[Sequence[np.ndarray]]], stat: Statistic, scale: float = 100,
                seed: int = 0) -> dict:
    """A run's value over seeds: {'post' (mean over seeds), 'lo', 'hi' (95% hierarchical
    bootstrap), 'n' (shared_cases), 'per_seed', 'seeds'} times `scale`."""
    per_seed = per_seed_values(strata, stat)
    n = shared_cases(strata)
    out = {"post": float(np.mean(per_seed)) * scale, "lo": None, "hi": None, "n": n,
           "per_seed": [v * scale for v in per_seed], "seeds": len(per_seed)}
    if n >= 2:
        lo, hi = percentile_interval(hierarchical_resamples(strata, stat, seed=seed))
        out.update(lo=lo * scale, hi=hi * scale)
    return out


def seeded_difference(strata: Sequence[Sequence[Sequence[np.ndarray]]], stat: Statistic, scale: float = 100,
                      seed: int = 0) -> dict:
    """A paired difference over seeds and cases: difference()'s dict ('diff' = the mean over seeds
    of the per-seed difference, 'lo', 'hi', 'p', 'sig' from the hierarchical bootstrap; 'n'
    shared_cases) plus 'per_seed', 'sd_seeds' (their standard deviation, ddof 1) and 'seeds'.
    No test (lo, hi, p None) with fewer than MIN_PAIRS shared cases."""
    per_seed = per_seed_values(strata, stat)
    n = shared_cases(strata)
    value = float(np.mean(per_seed))
    res = hierarchical_resamples(strata, stat, seed=seed) if n >= MIN_PAIRS else np.zeros(0)
    out = difference(res, value, n, scale)
    out.update(per_seed=[v * scale for v in per_seed], seeds=len(per_seed),
               sd_seeds=float(np.std(per_seed, ddof=1)) * scale if len(per_seed) > 1 else None)
    return out


def verdict(c: dict | None) -> str:
    """'significant' when the comparison's 95% interval excludes zero and it survives Holm's
    adjustment (its mark is ▲ or ▼), 'not significant' otherwise; '–' without a test."""
    if c is None or c.get("lo") is None:
        return "–"
    return "significant" if c.get("mark") in ("▲", "▼") else "not significant"
