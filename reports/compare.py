"""Paired comparisons of runs over the cases both finished: the baseline comparison, the pairwise
matrices, and the choice of the baseline run."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.core.errors import BenchError
from reports.groups import COMPOSITES, Column, Group, task_seed
from reports.runs import Run, finite_or_none
from reports.stats import MIN_PAIRS, adjust_marks, difference, paired_comparison, paired_score_resamples

class Pairing:
    """Paired comparisons of two runs of a group over the cases both finished (matched by task
    and case id), for a metric, a composite, or the overall Score."""

    def __init__(self, g: Group):
        self.g = g
        # keyed by the run object: slugs are unique only once assign_labels has run
        self._posts: dict[int, dict[tuple[str, str], dict]] = {id(r): r.case_posts() for r in g.runs}

    def _shared(self, a: Run, b: Run, task: str, terms: tuple[str, ...]) -> list[tuple[str, str]]:
        pa, pb = self._posts[id(a)], self._posts[id(b)]
        return sorted(k for k in pa.keys() & pb.keys() if k[0] == task
                      and all(finite_or_none(pa[k].get(m)) is not None and finite_or_none(pb[k].get(m)) is not None
                              for m in terms))

    def _score_resamples(self, a: Run, b: Run, task: str, key: str, seed: int = 0):
        terms = COMPOSITES[key][2]
        keys = self._shared(a, b, task, terms)
        if len(keys) < MIN_PAIRS:
            return None, None, len(keys)
        pa, pb = self._posts[id(a)], self._posts[id(b)]
        cols_a = [np.array([float(pa[k][m]) for k in keys]) for m in terms]
        cols_b = [np.array([float(pb[k][m]) for k in keys]) for m in terms]
        value, res = paired_score_resamples(cols_a, cols_b, seed)
        return value, res, len(keys)

    def comparable(self, a: Run, b: Run) -> bool:
        """Whether the two runs' case scores are readings of the same thing. In a sequential group
        a case's score is read after all of its run's edits, so runs of different lengths (ROME's
        first 100 cases after 100 edits, another run's after 1,000) are never paired."""
        return self.g.mode != "sequential" or len(a.cases) == len(b.cases)

    def compare(self, a: Run, b: Run, c: Column) -> dict | None:
        """`a` minus `b` in column `c` over their shared cases, or None without shared cases
        (or when they are not comparable)."""
        if not self.comparable(a, b):
            return None
        if c.composite:
            value, res, n = self._score_resamples(a, b, c.task, c.key)
            if n == 0:
                return None
            if value is None:
                return {"diff": None, "lo": None, "hi": None, "p": None, "n": n, "sig": 0}
            return difference(res, value, n)
        keys = self._shared(a, b, c.task, (c.key,))
        if not keys:
            return None
        pa, pb = self._posts[id(a)], self._posts[id(b)]
        return paired_comparison(np.array([float(pa[k][c.key]) for k in keys]),
                                 np.array([float(pb[k][c.key]) for k in keys]), scale=c.scale)

    def compare_overall(self, a: Run, b: Run) -> dict | None:
        """The difference of the overall Scores (mean over the ranking tasks), tasks resampled
        independently (task_seed); n = the shared cases of all tasks together."""
        g = self.g
        if g.rank_key is None or not g.rank_tasks or not self.comparable(a, b):
            return None
        values, res, ns = [], [], []
        for t in g.rank_tasks:
            value, r, n = self._score_resamples(a, b, t, g.rank_key, seed=task_seed(t))
            if value is None:
                return None
            values.append(value)
            res.append(r)
            ns.append(n)
        return difference(np.mean(res, axis=0), float(np.mean(values)), sum(ns))


DEFAULT_BASELINE = "ft"  # the baseline when none is named: an FT run (several: _choice picks one)


def _choice(g: Group, baseline: str, hits: list[Run], several_groups: bool) -> tuple[Run, str]:
    """The run the default baseline takes among several runs of editor `baseline` in group `g`:
    a complete run before an incomplete one, one with the editor's default hyperparameters (no
    --hparam / --hparams-file) before one with set ones, then the first given; and the line that
    says which and how to choose another."""
    order = sorted(range(len(hits)), key=lambda i: (not hits[i].complete, hits[i].hparam_overrides != {}, i))
    best = hits[order[0]]
    why = (["complete"] if best.complete and any(not r.complete for r in hits) else []) + \
        (["default hyperparameters"] if best.hparam_overrides == {} else [])
    rivals = [r for r in hits if r is not best and r.complete == best.complete
              and (r.hparam_overrides == {}) == (best.hparam_overrides == {})]
    if rivals:
        why.append("first given")
    where = f" for {g.model_spec}" if several_groups else ""
    labels = ", ".join(repr(r.label) for r in hits)
    return best, (f"Baseline{where}: {best.label} (run directory {best.name}), chosen among the "
                  f"{len(hits)} {baseline} runs ({', '.join(why)}); choose another with --baseline LABEL "
                  f"({labels}) or --baseline none.")


def resolve_baseline(groups: list[Group], baseline: str | None,
                     pick: bool = False) -> tuple[dict[str, Run | None], dict[str, str]]:
    """The baseline run of each group for `baseline`: a run directory name, a run label or an
    editor name (in that order of precedence); None or "none" means no comparison. Also, per
    group, a line saying how the default chose its run (see `pick`).

    Named by the user (`pick` False): an editor name that matches several runs of one group is a
    BenchError listing them (the choice must be explicit), and a name that matches no run of
    any group is a BenchError listing the labels. The default (`pick` True): several matching
    runs give one, chosen by _choice, and no match anywhere only a note in each group."""
    out: dict[str, Run | None] = {g.gid: None for g in groups}
    notes: dict[str, str] = {}
    if baseline is None or baseline == "none":
        return out, notes
    for g in groups:
        for attr in ("name", "label", "editor"):
            hits = [r for r in g.runs if getattr(r, attr) == baseline]
            if len(hits) > 1 and pick:
                out[g.gid], notes[g.gid] = _choice(g, baseline, hits, len(groups) > 1)
                break
            if len(hits) > 1:
                names = ", ".join(f"{r.name} (label '{r.label}')" for r in hits)
                raise BenchError(f"--baseline {baseline!r} matches {len(hits)} runs in one group "
                                 f"({names}); name one run by its directory name or label, "
                                 "or pass --baseline none")
            if hits:
                out[g.gid] = hits[0]
                break
    if not pick and all(run is None for run in out.values()):
        labels = ", ".join(repr(x) for x in dict.fromkeys(r.label for g in groups for r in g.runs))
        raise BenchError(f"--baseline {baseline!r} matches no run: name a run label ({labels}), a run "
                         "directory name or an editor name, or pass --baseline none")
    return out, notes


def comparison(g: Group, base: Run | None, baseline: str | None, pairing: Pairing | None = None,
               choice: str = "") -> dict:
    """Every other run of the group against the baseline run, per column and overall, over the
    cases both finished. Marks are Holm-adjusted over every non-reference cell of the table.
    `choice`: how the default baseline was chosen among several runs (resolve_baseline)."""
    out: dict[str, Any] = {"baseline": baseline, "base": base, "note": choice, "rows": [],
                           "columns": list(g.columns), "n_tests": 0}
    if baseline is None or baseline == "none":
        out["note"] = "No baseline chosen (--baseline none)."
        return out
    if base is None:
        out["note"] = f"Baseline '{baseline}' is not among the runs of this group; no comparison."
        return out
    if not base.cases:
        out["note"] = " ".join(x for x in (choice, "The baseline run has no cases.jsonl records; "
                                                    "no paired comparison possible.") if x)
    pairing = pairing or Pairing(g)
    family: list[dict] = []
    for r in g.runs:
        if r is base:
            continue
        cells = [pairing.compare(r, base, c) for c in g.columns]
        overall = pairing.compare_overall(r, base)
        if not r.reference:
            family += [c for c in cells + [overall] if c is not None]
        out["rows"].append({"run": r, "cells": cells, "overall": overall})
    adjust_marks(family)
    for row in out["rows"]:
        if row["run"].reference:
            for c in row["cells"] + [row["overall"]]:
                if c is not None:
                    c.update(p_holm=None, mark="")  # a reference line: no mark
    out["n_tests"] = sum(1 for c in family if c.get("p") is not None)
    out["rows"].sort(key=lambda row: row["run"].reference)
    return out


def pairwise(g: Group, pairing: Pairing | None = None) -> dict:
    """Every pair of competing runs (the no-edit reference left out) on the overall Score and on
    each task's Score: a matrix per scope; cell [i][j] = run i minus run j. Holm-adjusted over
    the unique pairs of every matrix together."""
    runs = [r for r in g.runs if not r.reference and r.cases]
    out: dict[str, Any] = {"runs": runs, "matrices": [], "n_tests": 0, "key": g.rank_key}
    if len(runs) < 2 or g.rank_key is None:
        return out
    pairing = pairing or Pairing(g)
    family: list[dict] = []
    scopes: list[tuple[str, str | None]] = [("all tasks (mean Score)", None)] + [(t, t) for t in g.rank_tasks]
    for title, task in scopes:
        m: list[list[dict | None]] = [[None] * len(runs) for _ in runs]
        for i, a in enumerate(runs):
            for j in range(i + 1, len(runs)):
                b = runs[j]
                cell = pairing.compare_overall(a, b) if task is None else \
                    pairing.compare(a, b, Column(task, g.rank_key, COMPOSITES[g.rank_key][1]))
                if cell is None:
                    continue
                m[i][j] = cell
                family.append(cell)
        out["matrices"].append({"title": title, "task": task, "cells": m})
    adjust_marks(family)
    for mat in out["matrices"]:  # the lower triangle mirrors the upper one
        cells = mat["cells"]
        for i in range(len(runs)):
            for j in range(i + 1, len(runs)):
                c = cells[i][j]
                if c is not None:
                    # 0.0 - x, not -x: a bound of exactly 0 mirrors to 0.0, never to -0.0
                    cells[j][i] = {**c, "diff": 0.0 - c["diff"] if c["diff"] is not None else None,
                                   "lo": 0.0 - c["hi"] if c["hi"] is not None else None,
                                   "hi": 0.0 - c["lo"] if c["lo"] is not None else None, "sig": -c["sig"],
                                   "mark": {"▲": "▼", "▼": "▲", "△": "▽", "▽": "△"}.get(c["mark"], c["mark"])}
    out["n_tests"] = sum(1 for c in family if c.get("p") is not None)
    return out
