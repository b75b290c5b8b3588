"""The leave-one-task-out matrix's cells over several training seeds, and its multi-task column
(`bench holdout-matrix --seeds ... --multitask`, docs/holdout.md).

* A cell with several seeds (one trained checkpoint per seed, each evaluated on the same cases)
  shows the mean over seeds of the per-seed value, the per-seed values, and a 95% interval from
  the hierarchical bootstrap of reports.hierarchical (seeds, then cases within each seed); a
  difference pairs the two editors seed by seed (the same training seed: the same batches) and
  case by case. With one seed the matrix keeps the report's ordinary statistic (reports.matrix).
* The multi-task column ("none" held out): both editors trained on every task with a train split,
  evaluated in distribution on each task; its mean row averages the per-task values over the
  tasks (each task weighs the same, as in the paper's summary) with an interval that resamples
  the cases within each task and, with several seeds, the seeds (one draw for all tasks: a
  seed's checkpoint serves every task).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from reports.groups import COMPOSITES
from reports.hierarchical import (mean_difference, mean_of, score_difference, score_of, seeded_cell,
                                  seeded_difference)
from reports.runs import Run, finite_or_none

MULTITASK = "none"  # the column key of the multi-task setting: no task held out
MEAN_ROW = "mean over tasks"
SEEDS_RULE = ("With {s} training seeds ({seeds}) each run is trained and evaluated once per seed: a cell "
              "is the mean over seeds of the per-seed value with its 95% hierarchical bootstrap interval "
              "(2,000 resamples: the seeds drawn with replacement, then the cases within each drawn seed), "
              "and a difference pairs the editors seed by seed and case by case, so that its interval and "
              "p-value count the seed as a source of variance; marks and verdicts come from that "
              "interval.")
MULTITASK_RULE = ("Multi-task (held out: none): both editors trained on every task with a train split and "
                  "evaluated in distribution on each; the mean row weighs every task alike, its interval "
                  "resamples the cases within each task{seeds}.")


def terms_of(metric: str) -> tuple[str, ...]:
    return tuple(COMPOSITES[metric][2]) if metric in COMPOSITES else (metric,)


class SeededStats:
    """The statistics of runs grouped by seed ({seed: Run}), over one task or the mean of
    several; the runs' case scores are read once."""

    def __init__(self) -> None:
        self._posts: dict[int, dict[tuple[str, str], dict]] = {}

    def _rows(self, run: Run, task: str, terms: tuple[str, ...]) -> dict[str, list[float]]:
        """case id -> the terms' values, for the run's finished cases of `task` having all."""
        posts = self._posts.setdefault(id(run), run.case_posts())
        out = {}
        for (t, case_id), post in posts.items():
            if t != task:
                continue
            values = [finite_or_none(post.get(m)) for m in terms]
            if all(v is not None for v in values):
                out[case_id] = [float(v) for v in values]
        return out

    def _single(self, runs: dict[int, Run], task: str, terms: tuple[str, ...]) -> list[list[np.ndarray]] | None:
        """Per seed (sorted): the run's columns on `task`; None when a seed has no case."""
        out = []
        for seed in sorted(runs):
            rows = self._rows(runs[seed], task, terms)
            if not rows:
                return None
            keys = sorted(rows)
            out.append([np.array([rows[k][j] for k in keys]) for j in range(len(terms))])
        return out

    def _paired(self, a: dict[int, Run], b: dict[int, Run], task: str,
                terms: tuple[str, ...]) -> list[list[np.ndarray]] | None:
        """Per seed both editors have (sorted): a's columns then b's on their shared cases; None
        when they share no seed or a seed shares no case."""
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return None
        out = []
        for seed in seeds:
            ra, rb = self._rows(a[seed], task, terms), self._rows(b[seed], task, terms)
            keys = sorted(ra.keys() & rb.keys())
            if not keys:
                return None
            out.append([np.array([ra[k][j] for k in keys]) for j in range(len(terms))]
                       + [np.array([rb[k][j] for k in keys]) for j in range(len(terms))])
        return out

    def cell(self, runs: dict[int, Run], tasks: Iterable[str], metric: str) -> dict | None:
        """The runs' value on `tasks` (the mean over them when several) over the seeds."""
        terms = terms_of(metric)
        strata = [self._single(runs, t, terms) for t in tasks]
        if not strata or any(s is None for s in strata):
            return None
        return seeded_cell(strata, score_of if metric in COMPOSITES else mean_of)

    def difference(self, a: dict[int, Run], b: dict[int, Run], tasks: Iterable[str], metric: str) -> dict | None:
        """a minus b on `tasks` (the mean over them when several), paired by seed and case."""
        terms = terms_of(metric)
        strata = [self._paired(a, b, t, terms) for t in tasks]
        if not strata or any(s is None for s in strata) or len({len(s) for s in strata}) != 1:
            return None
        return seeded_difference(strata, score_difference if metric in COMPOSITES else mean_difference)


def seeds_text(values: list[float] | None) -> str:
    """'61.0 / 55.2 / 58.1': the per-seed values of a cell, in seed order."""
    return " / ".join(f"{v:.1f}" for v in values) if values else "–"


def spread_text(c: dict | None) -> str:
    """A difference's per-seed values and their spread: '+12.0 / +18.1 / +21.4 (sd 4.8)'."""
    if c is None or not c.get("per_seed"):
        return "–"
    sd = "" if c.get("sd_seeds") is None else f" (sd {c['sd_seeds']:.1f})"
    return " / ".join(f"{v:+.1f}" for v in c["per_seed"]) + sd


def seed_table(view: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per row, metric and run or difference: the per-seed values, the mean, and for a difference
    its interval and verdict (None when the matrix has one seed)."""
    if len(view.get("seeds") or []) < 2:
        return None
    head = ["held out", "metric", "run or difference", f"per seed ({', '.join(map(str, view['seeds']))})",
            "mean [95% interval]", "verdict"]
    body = []
    for row in view["rows"]:
        for m in view["metrics"]:
            for c in row["columns"]:
                s = c["cells"].get(m)
                if s is None:
                    continue
                ci = "" if s.get("lo") is None else f" [{s['lo']:.1f}, {s['hi']:.1f}]"
                body.append([row["holdout"], m, c["label"], seeds_text(s.get("per_seed")),
                             f"{s['post']:.1f}{ci}", ""])
            for d in row["diffs"]:
                x = d["cells"].get(m)
                if x is None or x.get("diff") is None:
                    continue
                ci = "" if x.get("lo") is None else f" [{x['lo']:+.1f}, {x['hi']:+.1f}]"
                body.append([row["holdout"], m, d["label"], spread_text(x), f"{x['diff']:+.1f}{ci}",
                             x.get("verdict", "–")])
    return head, body


def multitask_summary(view: dict, metric: str = "reliability") -> list[str]:
    """The paper's summary number, one line per difference: the first editor minus the other in
    `metric`, averaged over the multi-task column's tasks, with its interval and verdict."""
    row = next((r for r in view["rows"] if r.get("column") == MULTITASK and r.get("task") is None), None)
    if row is None:
        return []
    out = []
    for d in row["diffs"]:
        x = d["cells"].get(metric)
        if x is None or x.get("diff") is None:
            continue
        ci = "" if x.get("lo") is None else f" [{x['lo']:+.1f}, {x['hi']:+.1f}]"
        seeds = "" if not x.get("per_seed") or len(x["per_seed"]) < 2 else f"; per seed {spread_text(x)}"
        out.append(f"Multi-task setting, {d['label']}: {metric} averaged over {len(row['tasks'])} tasks "
                   f"{x['diff']:+.1f} points{ci}, {x.get('verdict', '–')}{seeds} (the InstructEdit paper "
                   f"reports an average increase of 14.86% in reliability in its own multi-task setting)")
    return out
