"""The overview: one row per run, ranked by the composite Score on equal footing, in rank groups
that agree with the pairwise tests.

* **Equal footing.** Only runs that finished as many cases as the group's other runs are ranked
  (Group.fewer_cases); a run on fewer cases is listed, marked, and kept out of the ranking, the
  best-value marks and the verdicts, so that every number those compare is on the same cases.
* **Rank groups from the pairwise tests.** Two runs are significantly different when their
  paired comparison on the mean Score (the pairwise "all tasks" table, Holm-adjusted over every
  pairwise comparison of the group) is marked ▲/▼. A run's rank is 1 + the highest rank among
  the runs ranked above it (by Score) that it differs from significantly (1 when none): two runs
  that share a rank are never significantly different. The compact letter display (Piepho 2004,
  insert-absorb) says the rest: two runs share a letter exactly when they do not differ
  significantly.
"""

from __future__ import annotations

import string

import numpy as np

from reports.groups import COMPOSITES, Group, composite_cases, mean_of, task_seed
from reports.runs import Run
from reports.stats import percentile_interval, resampled_score

RANK_RULE = ("Ranked by the mean over tasks of the per-task Score, with a 95% bootstrap interval "
             "(cases resampled within each task, independently between tasks). Ranks come from the "
             "pairwise tests of that mean (the pairwise \u201call tasks\u201d table, Holm-adjusted): a run's "
             "rank is 1 + the highest rank among the runs ahead of it that differ from it significantly "
             "(\u25b2/\u25bc), so runs that share a rank (=) are never significantly different; the letters "
             "(compact letter display) say the rest: two runs share a letter exactly when their difference "
             "is not significant. Only runs on equal footing are ranked: the no-edit run is a reference "
             "line; a run that did not finish (fewer finished cases than planned, or a planned task without "
             "results) is marked \u201cincomplete (n of N cases)\u201d and a complete run on fewer cases "
             "than the group's other runs \u201cfewer cases (n of N per task)\u201d: neither is ranked, "
             "marked best or named in a verdict, so that the ranking, the best values and the verdicts "
             "compare the same cases.")


def overall_score(g: Group, r: Run) -> dict | None:
    """The mean over the group's ranking tasks of the run's Score, with a 95% interval from
    resampling cases within each task (each task with its own seed, task_seed)."""
    if g.rank_key is None or not g.rank_tasks:
        return None
    cells = [g.composite.get((r.slug, t, g.rank_key)) for t in g.rank_tasks]
    if any(c is None for c in cells):
        return None
    value = float(np.mean([c["post"] for c in cells]))
    terms = COMPOSITES[g.rank_key][2]
    res = []
    for t in g.rank_tasks:
        rows = composite_cases(r, t, terms)
        if len(rows) < 2:
            return {"value": value, "lo": None, "hi": None, "n_tasks": len(cells)}
        res.append(resampled_score([np.array([p[m] for _, _, p in rows], dtype=float) for m in terms],
                                   seed=task_seed(t)))
    lo, hi = percentile_interval(np.mean(res, axis=0))
    return {"value": value, "lo": lo * 100, "hi": hi * 100, "n_tasks": len(cells)}


def competes(g: Group, r: Run) -> bool:
    """The run takes part in the ranking, the best-value marks and the verdicts: not the no-edit
    reference, not an incomplete run, not a run on fewer cases than the group's others."""
    return not r.reference and r.complete and not g.fewer_cases(r)


def best_flags(g: Group, rows: list[dict], n_cols: int) -> None:
    """Per column, the competing rows (competes) with the highest value: row['best'][i]."""
    for row in rows:
        row["best"] = [False] * n_cols
    for i in range(n_cols):
        vals = [(row, row["cells"][i]["post"]) for row in rows
                if competes(g, row["run"]) and row["cells"][i] is not None and row["cells"][i]["post"] is not None]
        if len(vals) < 2:
            continue
        top = max(v for _, v in vals)
        for row, v in vals:
            if abs(v - top) < 1e-9:
                row["best"][i] = True


def significant_pairs(pw: dict | None) -> set[tuple[int, int]]:
    """{(id(a), id(b))} of the runs whose paired comparison on the mean Score (the pairwise
    "all tasks" matrix) survives Holm's adjustment (▲ or ▼), both orders."""
    out: set[tuple[int, int]] = set()
    if not pw or not pw.get("matrices"):
        return out
    mat = next((m for m in pw["matrices"] if m["task"] is None), None)
    if mat is None:
        return out
    runs = pw["runs"]
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            c = mat["cells"][i][j]
            if i != j and c is not None and c.get("mark") in ("▲", "▼"):
                out |= {(id(a), id(b)), (id(b), id(a))}
    return out


def rank_groups(order: list[Run], sig: set[tuple[int, int]]) -> list[int]:
    """Ranks of the runs in `order` (best Score first): 1 + the highest rank among the earlier
    runs that differ significantly from the run, 1 when none does. Runs with one rank never
    differ significantly: a significant pair always gets different ranks."""
    ranks: list[int] = []
    for i, r in enumerate(order):
        above = [ranks[j] for j in range(i) if (id(order[j]), id(r)) in sig]
        ranks.append(1 + max(above) if above else 1)
    return ranks


def letter_display(order: list[Run], sig: set[tuple[int, int]]) -> list[str]:
    """The compact letter display of the runs in `order` (best first) by Piepho's insert-absorb
    algorithm: two runs share a letter exactly when they do not differ significantly. Letters
    are given in order of the best run each letter holds ('a' for the top run's)."""
    n = len(order)
    columns: list[set[int]] = [set(range(n))] if n else []
    for i in range(n):
        for j in range(i + 1, n):
            if (id(order[i]), id(order[j])) not in sig:
                continue
            split: list[set[int]] = []
            for col in columns:
                if i in col and j in col:
                    split += [col - {i}, col - {j}]
                else:
                    split.append(col)
            # absorb: drop a column contained in another (and duplicates)
            split = [c for k, c in enumerate(split) if c and not any(
                (c < o) or (c == o and m < k) for m, o in enumerate(split) if m != k)]
            columns = split
    columns.sort(key=lambda c: (min(c), -len(c)))
    names = [string.ascii_lowercase[k] if k < 26 else f"{string.ascii_lowercase[k % 26]}{k // 26}"
             for k in range(len(columns))]
    return ["".join(names[k] for k, col in enumerate(columns) if i in col) for i in range(n)]


def overview(g: Group, pw: dict | None = None) -> list[dict]:
    """One row per run: its cells, the overall Score, the rank and letters (rank_groups,
    letter_display; from the pairwise tests `pw`, reports.compare.pairwise), the cost, and the
    marks of a run not on equal footing. Ranked runs first (by rank, then Score), then the
    others (incomplete runs and runs on fewer cases among them), the no-edit reference last."""
    rows = []
    for r in g.runs:
        means = {m: mean_of([(r.stat(t, m) or {}).get("post") for t in r.tasks]) for m in g.mean_metrics}
        rows.append({"run": r, "cells": [g.cell(r, c) for c in g.columns], "means": means,
                     "overall": overall_score(g, r),
                     "missing_tasks": [t for t in g.tasks if t not in r.summary["tasks"]],
                     "fewer": g.fewer_mark(r), "fewer_cases": g.fewer_cases(r),
                     "cost": {"edit_s": r.median_edit_s(), "peak_mb": r.peak_memory_mb(), "training": r.training},
                     "rank": None, "tied": False, "letters": ""})
    ranked = sorted((row for row in rows if competes(g, row["run"]) and row["overall"] is not None),
                    key=lambda row: -row["overall"]["value"])
    sig = significant_pairs(pw)
    order = [row["run"] for row in ranked]
    for row, rank, letters in zip(ranked, rank_groups(order, sig), letter_display(order, sig)):
        row["rank"], row["letters"] = rank, letters
    for row in ranked:
        row["tied"] = sum(1 for x in ranked if x["rank"] == row["rank"]) > 1
    rows.sort(key=lambda row: (row["run"].reference, row["rank"] is None, row["rank"] or 0,
                               -(row["overall"]["value"] if row["overall"] else -1.0)))
    best_flags(g, rows, len(g.columns))
    top = max((row["overall"]["value"] for row in ranked), default=None)
    for row in rows:
        row["best_overall"] = len(ranked) > 1 and any(x is row for x in ranked) and \
            abs(row["overall"]["value"] - top) < 1e-9
    return rows
