"""The report's statistics, all on the core's one bootstrap (bench.core.metrics.bootstrap_means,
2,000 resamples, seed 0):

* the composite Score of ROME (Meng et al. 2022): the harmonic mean of an edit term, a
  generalisation term and a locality term, per task, with a bootstrap interval over cases;
* paired comparisons of two runs over the cases both finished: the difference, its 95% percentile
  interval and a p-value read off the same resamples (the interval inverted), so that the mark
  and the interval cannot disagree: p < 0.05 exactly when the 95% interval excludes zero;
* Holm's step-down adjustment over every comparison of one table.

Resampling several columns "jointly" (the same cases drawn for each) relies on the bootstrap's
draws depending only on the seed, the number of values and the number of resamples: columns of
equal length resampled with the same seed are resampled at the same case indices.
"""

from __future__ import annotations

import math

import numpy as np

from bench.core.metrics import N_BOOTSTRAP, bootstrap_means

ALPHA = 0.05  # two-sided level of every mark and interval (95%)
MIN_PAIRS = 5  # fewer shared cases: no interval, no test (a bootstrap of 2-4 values is no test)


def harmonic_mean(values: object) -> np.ndarray | float:
    """Element-wise harmonic mean over the first axis; 0 when any term is 0 (an edit that fails
    one of the three is worth nothing), as in ROME's Score."""
    v = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore"):
        inv = np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), np.inf)
    return len(v) / inv.sum(axis=0)


def resampled_score(columns: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """The Score (fraction) of every bootstrap resample of the cases: each column (one metric,
    one value per case, all of equal length) resampled at the same indices, its mean taken, and
    the harmonic mean of the column means."""
    return harmonic_mean([bootstrap_means(c, N_BOOTSTRAP, seed) for c in columns])


def percentile_interval(resamples: np.ndarray, level: float = 1 - ALPHA) -> tuple[float, float]:
    """The percentile interval of `resamples` (as bench.core.metrics.bootstrap_ci reads it)."""
    a = (1 - level) / 2
    return float(np.quantile(resamples, a)), float(np.quantile(resamples, 1 - a))


def score_with_interval(columns: list[np.ndarray], seed: int = 0) -> dict:
    """{'value', 'lo', 'hi', 'n'} in percent: the Score of the cases' column means and its 95%
    bootstrap interval over cases."""
    cols = [np.asarray(c, dtype=float) for c in columns]
    n = len(cols[0])
    value = float(harmonic_mean([c.mean() for c in cols])) * 100
    if n < 2:
        return {"value": value, "lo": None, "hi": None, "n": n}
    lo, hi = percentile_interval(resampled_score(cols, seed))
    return {"value": value, "lo": lo * 100, "hi": hi * 100, "n": n}


def interval_pvalue(resamples: np.ndarray) -> float:
    """Two-sided p-value of "the mean difference is zero", read off the bootstrap resamples by
    inverting the percentile interval: the smallest a for which the (1 - a) percentile interval
    (np.quantile, linear interpolation, as the intervals are computed) still contains zero. Hence
    p < ALPHA exactly when the (1 - ALPHA) interval excludes zero."""
    s = np.sort(np.asarray(resamples, dtype=float))
    b = len(s)
    if b < 2:
        return float("nan")

    def crossing(i: int) -> float:
        # q at which the interpolated quantile between sorted values i and i+1 equals zero
        return (i + (-s[i] / (s[i + 1] - s[i]) if s[i + 1] != s[i] else 0.0)) / (b - 1)

    le = np.nonzero(s <= 0)[0]  # q_high = sup{q: quantile(q) <= 0}
    if len(le) == 0:
        q_high = 0.0
    elif le[-1] == b - 1:
        q_high = 1.0
    else:
        q_high = crossing(int(le[-1]))
    ge = np.nonzero(s >= 0)[0]  # q_low = inf{q: quantile(q) >= 0}
    if len(ge) == 0:
        q_low = 1.0
    elif ge[0] == 0:
        q_low = 0.0
    else:
        q_low = crossing(int(ge[0]) - 1)
    return float(min(1.0, 2 * min(q_high, 1 - q_low)))


def difference(resamples: np.ndarray, value: float, n: int, scale: float = 100) -> dict:
    """A paired difference as the tables show it, times `scale` (fractions to points): {'diff',
    'lo', 'hi', 'p', 'n', 'sig'}; sig is +1 / -1 when the 95% interval lies above / below zero,
    else 0."""
    if n < MIN_PAIRS or len(resamples) < 2:
        return {"diff": value * scale, "lo": None, "hi": None, "p": None, "n": n, "sig": 0}
    lo, hi = percentile_interval(resamples)
    sig = 1 if lo > 0 else -1 if hi < 0 else 0
    return {"diff": value * scale, "lo": lo * scale, "hi": hi * scale, "p": interval_pvalue(resamples),
            "n": n, "sig": sig}


def paired_comparison(scores: np.ndarray, base_scores: np.ndarray, scale: float = 100) -> dict:
    """A run's case scores against another run's on the same cases (one metric): the mean
    difference with its bootstrap interval and p-value, plus both means, times `scale` (100:
    fractions to points; 1 for a metric in its own unit)."""
    a, b = np.asarray(scores, dtype=float), np.asarray(base_scores, dtype=float)
    d = a - b
    out = difference(bootstrap_means(d, N_BOOTSTRAP, 0) if len(d) >= MIN_PAIRS else np.zeros(0),
                     float(d.mean()) if len(d) else 0.0, len(d), scale)
    out.update(editor_mean=float(a.mean()) * scale if len(a) else None,
               base_mean=float(b.mean()) * scale if len(b) else None)
    return out


def paired_score_resamples(a_columns: list[np.ndarray], b_columns: list[np.ndarray],
                           seed: int = 0) -> tuple[float, np.ndarray]:
    """Score(a) - Score(b) on shared cases (fractions) and its resamples: all six columns
    resampled at the same case indices."""
    value = float(harmonic_mean([np.mean(c) for c in a_columns]) - harmonic_mean([np.mean(c) for c in b_columns]))
    return value, resampled_score(a_columns, seed) - resampled_score(b_columns, seed)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None and NaN stay None): family-wise error at most
    ALPHA over the whole list."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * float(pvalues[i])))
        out[i] = running
    return out


def mark(sig: int, p_adjusted: float | None) -> str:
    """▲ / ▼: the 95% interval excludes zero and the comparison survives Holm's adjustment;
    △ / ▽: the interval excludes zero but not after the adjustment; · the interval contains zero
    (or no test: too few shared cases)."""
    if sig == 0:
        return "·"
    strong = p_adjusted is not None and p_adjusted < ALPHA
    if sig > 0:
        return "▲" if strong else "△"
    return "▼" if strong else "▽"


def adjust_marks(cells: list[dict]) -> None:
    """Holm over `cells` (one table's comparisons): sets each cell's 'p_holm' and 'mark'."""
    adj = holm([c.get("p") for c in cells])
    for c, pa in zip(cells, adj):
        c["p_holm"] = pa
        c["mark"] = mark(c["sig"], pa)


def signed(x: float | None) -> str:
    """A difference with its sign and one decimal; '0.0' for exactly zero (never '-0.0' nor
    '+0.0'), and a non-zero value that rounds to zero with one significant digit ('-0.04'), so
    that the sign shown is the sign of the value."""
    if x is None:
        return "–"
    if x == 0:
        return "0.0"
    s = f"{x:+.1f}"
    return f"{x:+.1g}" if s in ("+0.0", "-0.0") else s


def p_text(p: float | None) -> str:
    """'p<0.001' or 'p=0.183' (format_p's value with its sign)."""
    v = format_p(p)
    return "p" + v if v.startswith("<") else f"p={v}"


def format_p(p: float | None) -> str:
    """The one p-value format of every output: '<0.001' below 0.001, else three decimals."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_text(x: dict | None) -> str:
    """One paired comparison as plain text: difference, mark, interval, p (and Holm's), n."""
    if x is None:
        return "–"
    if x.get("diff") is None:
        return f"– (n={x['n']})"
    if x.get("lo") is None:
        return f"{signed(x['diff'])} (n={x['n']} < {MIN_PAIRS}: no test)"
    mark = f" {x['mark']}" if x.get("mark") else ""
    holm = "" if x.get("p_holm") is None else f" (Holm {format_p(x['p_holm'])})"
    return f"{signed(x['diff'])}{mark} [{signed(x['lo'])}, {signed(x['hi'])}] {p_text(x['p'])}{holm} n={x['n']}"
