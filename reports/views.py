"""What the report shows, as plain data for the templates and the exports: the groups of runs
that may be ranked together, and per group the overview (ranked by the composite Score), the
held-out view, the baseline comparison, the pairwise comparisons, the verdicts; plus the
per-case rows of the drill-down pages.

Runs are ranked together only when they share the model (``config.model.spec`` +
``source_hash``), the metric definitions (``config.metric_definitions``), the run mode (single
edits or sequential edits, ``config.mode``) and the prompt format: each combination gets its own
group. Teacher-forced, CounterFact and in-the-wild metrics are separate columns (families).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.core.errors import BenchError
from bench.core.metrics import ALL_METRICS, METRIC_BY_NAME, TOKEN_METRICS, WILD_COUNTERPART
from reports.runs import Run, finite_or_none
from reports.stats import (MIN_PAIRS, adjust_marks, difference, harmonic_mean, paired_comparison,
                           paired_score_resamples, percentile_interval, resampled_score,
                           score_with_interval)

# The composites: ROME's Score (harmonic mean of the edit, generalisation and locality terms)
# for each family that has the three terms. key -> (label, family, terms, description)
COMPOSITES = {
    "score": ("Score", "token", ("reliability", "generality", "locality"),
              "harmonic mean of reliability, generality and locality (teacher forced)"),
    "cf_score": ("CF-Score", "counterfact", ("efficacy", "paraphrase", "neighborhood"),
                 "harmonic mean of efficacy, paraphrase and neighborhood (CounterFact, ROME's Score)"),
    "wild_score": ("W-Score", "wild", ("wild_reliability", "wild_generality", "wild_locality"),
                   "harmonic mean of the wild reliability, generality and locality"),
}
FAMILIES = {  # family -> (toggle label, short header label, shown before the reader asks)
    "token": ("teacher forced (token accuracy)", "teacher forced", True),
    "counterfact": ("CounterFact (probability comparison)", "CounterFact prob.", True),
    "wild": ("in the wild (generated answers)", "in the wild", False),
    "generation": ("generation (fluency, bits)", "generation", False),
}
METRIC_ABBR = {**{m: METRIC_BY_NAME[m].abbr for m in ALL_METRICS}, **{k: v[0] for k, v in COMPOSITES.items()}}
METRICS = TOKEN_METRICS  # the per-metric means of the overview ("Mean across tasks")
LOCALITY_TYPE = ("locality", "wild_locality", "neighborhood")  # a drop = the edit broke something
FAILURE_RULE = ("a case fails when its edit raised an error, when post-edit reliability is below 1, "
                "or when a locality-type score (locality, wild locality, neighborhood) is lower after "
                "the edit than before it")
HOLDOUT_RULE = ("A task is held out for a run when the run's editor never trained on it: a learned "
                "editor (one whose run records its training tasks, such as MEND and InstructEdit) "
                "sees only the tasks it trained on, and an editor that does not train (FT, ROME, the "
                "no-edit reference) saw no task, so every task is held out for it. Every run is "
                "listed; \u201ctrained on\u201d marks a task a learned editor trained on.")
RANK_RULE = ("Ranked by the mean over tasks of the per-task Score, with a 95% bootstrap interval "
             "(cases resampled within each task, independently between tasks). A run's rank is 1 + the number of runs whose "
             "interval lies entirely above its own: runs whose intervals overlap share a rank (=). "
             "The no-edit run is a reference line, not ranked. A run that did not finish (fewer finished "
             "cases than planned, or a planned task without results) is listed with an "
             "\u201cincomplete (n of N cases)\u201d mark and not ranked.")


def task_seed(task: str) -> int:
    """The bootstrap seed of `task` in the overall Score: fixed by the task's name (not its place
    in a report), different between tasks so that their resamples are independent."""
    return zlib.crc32(task.encode("utf-8"))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass(frozen=True)
class Column:
    task: str
    key: str  # a metric name, or a composite key (COMPOSITES)
    family: str

    @property
    def composite(self) -> bool:
        return self.key in COMPOSITES

    @property
    def abbr(self) -> str:
        return METRIC_ABBR.get(self.key, self.key)

    @property
    def title(self) -> str:
        if self.composite:
            return f"{self.task} · {COMPOSITES[self.key][3]}"
        m = METRIC_BY_NAME.get(self.key)
        return f"{self.task} · {self.key}" + (f": {m.text}" if m else "")

    @property
    def scale(self) -> float:
        """Case values (fractions) to the shown unit: points, or the metric's own unit."""
        m = METRIC_BY_NAME.get(self.key)
        return 1.0 if m is not None and not m.percent else 100.0


def family_of(metric: str) -> str:
    if metric in COMPOSITES:
        return COMPOSITES[metric][1]
    m = METRIC_BY_NAME.get(metric)
    return m.family if m else "token"


@dataclass
class Group:
    model_spec: str
    model_hash: str
    metric_definitions: str
    mode: str
    prompt_format: str
    runs: list[Run]
    gid: str = ""
    tasks: list[str] = field(default_factory=list)
    task_metrics: dict[str, list[str]] = field(default_factory=dict)
    columns: list[Column] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    mean_metrics: list[str] = field(default_factory=list)
    rank_key: str | None = None  # the composite the ranking averages over tasks
    rank_tasks: list[str] = field(default_factory=list)
    # (run slug, task, composite key) -> {'post','pre','lo','hi','n'} (None: not computable)
    composite: dict[tuple[str, str, str], dict | None] = field(default_factory=dict)

    @property
    def heading(self) -> str:
        h = f" (source sha256 {self.model_hash[:12]})" if self.model_hash else " (no source hash)"
        mode = "sequential edits (every edit kept)" if self.mode == "sequential" else "single edits"
        fmt = f" · prompt format {self.prompt_format}" if self.prompt_format != "plain" else ""
        return f"Model {self.model_spec}{h} · metric definitions {self.metric_definitions} · {mode}{fmt}"

    def holdout_status(self, task: str) -> str:
        """'all', 'some' or 'none' of the group's runs that have the task never trained on it."""
        flags = [r.unseen(task) for r in self.runs if task in r.summary["tasks"]]
        if flags and all(flags):
            return "all"
        return "some" if any(flags) else "none"

    def heldout_for(self, task: str) -> list[str]:
        """Labels of the learned runs that held `task` out (the runs it is news to)."""
        return [r.label for r in self.runs if task in r.summary["tasks"] and r.train_tasks is not None
                and r.unseen(task)]

    def cell(self, r: Run, c: Column) -> dict | None:
        """The shown value of run `r` in column `c`: {'post','pre','lo','hi','n'} or None."""
        if c.composite:
            return self.composite.get((r.slug, c.task, c.key))
        return r.stat(c.task, c.key)


# --------------------------------------------------------------------------------------------
# Groups and composites
# --------------------------------------------------------------------------------------------

def _composite_cases(r: Run, task: str, terms: tuple[str, ...]) -> list[tuple[str, dict, dict]]:
    """(case id, pre, post) of the run's finished cases of `task` that have every term."""
    out = []
    for rec in r.cases:
        if str(rec.get("task")) != task or rec.get("error") or not isinstance(rec.get("post"), dict):
            continue
        post = rec["post"]
        pre = rec.get("pre") if isinstance(rec.get("pre"), dict) else {}
        if all(finite_or_none(post.get(m)) is not None for m in terms):
            out.append((str(rec["case_id"]), pre, post))
    return out


def composite_cell(r: Run, task: str, key: str, seed: int = 0) -> dict | None:
    """The run's composite `key` on `task` from its cases.jsonl, with a 95% bootstrap interval
    over cases; from summary.json's means (no interval) when the run has no case records."""
    terms = COMPOSITES[key][2]
    rows = _composite_cases(r, task, terms)
    if rows:
        s = score_with_interval([np.array([p[m] for _, _, p in rows], dtype=float) for m in terms], seed)
        pres = [[finite_or_none(pre.get(m)) for _, pre, _ in rows] for m in terms]
        pre = None if any(v is None for col in pres for v in col) else \
            float(harmonic_mean([np.mean(col) for col in pres])) * 100
        return {"post": s["value"], "pre": pre, "lo": s["lo"], "hi": s["hi"], "n": s["n"]}
    if r.cases:
        return None
    stats = [r.stat(task, m) for m in terms]
    if any(s is None or s["post"] is None for s in stats):
        return None
    pre = None if any(s["pre"] is None for s in stats) else float(harmonic_mean([s["pre"] / 100 for s in stats])) * 100
    return {"post": float(harmonic_mean([s["post"] / 100 for s in stats])) * 100, "pre": pre,
            "lo": None, "hi": None, "n": min(s["n"] or 0 for s in stats) or None}


def make_groups(runs: list[Run]) -> list[Group]:
    """One group per (model, source hash, metric definitions, mode, prompt format), in order of
    first appearance, with its columns and every run's composites."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = r.comparison_key
        if key not in groups:
            groups[key] = Group(*key, runs=[])
        groups[key].runs.append(r)
    out = list(groups.values())
    for i, g in enumerate(out, 1):
        g.gid = f"g{i}"
        for r in g.runs:
            for t in r.tasks:
                if t not in g.tasks:
                    g.tasks.append(t)
        for t in g.tasks:
            g.task_metrics[t] = [m for m in ALL_METRICS if any(r.stat(t, m) is not None for r in g.runs)]
            for key, (_, fam, terms, _) in COMPOSITES.items():
                if all(m in g.task_metrics[t] for m in terms):
                    for r in g.runs:
                        g.composite[(r.slug, t, key)] = composite_cell(r, t, key)
        fams = [f for f in FAMILIES if any(family_of(m) == f for t in g.tasks for m in g.task_metrics[t])]
        for f in fams:
            for t in g.tasks:
                g.columns += [Column(t, k, f) for k, v in COMPOSITES.items()
                              if v[1] == f and (g.runs[0].slug, t, k) in g.composite]
                g.columns += [Column(t, m, f) for m in g.task_metrics[t] if family_of(m) == f]
        # columns ordered task by task, each task's families in FAMILIES order
        g.columns.sort(key=lambda c: (g.tasks.index(c.task), list(FAMILIES).index(c.family)))
        g.families = [f for f in FAMILIES if any(c.family == f for c in g.columns)]
        g.mean_metrics = [m for m in METRICS if any(m in g.task_metrics[t] for t in g.tasks)]
        g.rank_key = next((k for k in ("score", "wild_score")
                           if any(c.key == k for c in g.columns)), None)
        g.rank_tasks = [t for t in g.tasks if any(c.key == g.rank_key and c.task == t for c in g.columns)]
    return out


def task_columns(g: Group, task: str) -> list[Column]:
    return [c for c in g.columns if c.task == task]


# --------------------------------------------------------------------------------------------
# Overview
# --------------------------------------------------------------------------------------------

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
        rows = _composite_cases(r, t, terms)
        if len(rows) < 2:
            return {"value": value, "lo": None, "hi": None, "n_tasks": len(cells)}
        res.append(resampled_score([np.array([p[m] for _, _, p in rows], dtype=float) for m in terms],
                                   seed=task_seed(t)))
    lo, hi = percentile_interval(np.mean(res, axis=0))
    return {"value": value, "lo": lo * 100, "hi": hi * 100, "n_tasks": len(cells)}


def _competes(r: Run) -> bool:
    """The run takes part in the ranking and the best-value marks: not the no-edit reference,
    not an incomplete run."""
    return not r.reference and r.complete


def _best_flags(rows: list[dict], n_cols: int) -> None:
    """Per column, the rows (references and incomplete runs left out) with the highest value:
    row['best'][i]."""
    for row in rows:
        row["best"] = [False] * n_cols
    for i in range(n_cols):
        vals = [(row, row["cells"][i]["post"]) for row in rows
                if _competes(row["run"]) and row["cells"][i] is not None and row["cells"][i]["post"] is not None]
        if len(vals) < 2:
            continue
        top = max(v for _, v in vals)
        for row, v in vals:
            if abs(v - top) < 1e-9:
                row["best"][i] = True


def overview(g: Group) -> list[dict]:
    """One row per run: its cells, the overall Score, the rank (ties shared), the cost. Ranked
    runs first (by rank, then Score), then unranked ones (incomplete runs among them), the no-edit
    reference last."""
    rows = []
    for r in g.runs:
        means = {m: _mean([(r.stat(t, m) or {}).get("post") for t in r.tasks]) for m in g.mean_metrics}
        rows.append({"run": r, "cells": [g.cell(r, c) for c in g.columns], "means": means,
                     "overall": overall_score(g, r),
                     "missing_tasks": [t for t in g.tasks if t not in r.summary["tasks"]],
                     "cost": {"edit_s": r.median_edit_s(), "peak_mb": r.peak_memory_mb()},
                     "rank": None, "tied": False})
    ranked = [row for row in rows if _competes(row["run"]) and row["overall"] is not None]
    for row in ranked:
        o = row["overall"]
        above = [x for x in ranked if x is not row and o["hi"] is not None and x["overall"]["lo"] is not None
                 and x["overall"]["lo"] > o["hi"]]
        row["rank"] = 1 + len(above)
    for row in ranked:
        row["tied"] = sum(1 for x in ranked if x["rank"] == row["rank"]) > 1
    rows.sort(key=lambda row: (row["run"].reference, row["rank"] is None, row["rank"] or 0,
                               -(row["overall"]["value"] if row["overall"] else -1.0)))
    _best_flags(rows, len(g.columns))
    top = max((row["overall"]["value"] for row in ranked), default=None)
    for row in rows:
        row["best_overall"] = len(ranked) > 1 and any(x is row for x in ranked) and \
            abs(row["overall"]["value"] - top) < 1e-9
    return rows


# --------------------------------------------------------------------------------------------
# Across models
# --------------------------------------------------------------------------------------------

def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-b of two paired score lists (None with fewer than two pairs or no order)."""
    conc = disc = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / denom if denom else None


def cross_model(groups: list[Group], ov: dict[str, list[dict]]) -> list[dict]:
    """For groups that differ only in the model (same metric definitions, mode and prompt
    format): per editor (run label), its rank and overall Score on each model, and per pair of
    models whether the rankings agree (Kendall's tau-b over the editors ranked on both, and
    whether the same editors share rank 1). Ranks are each model's own, on its own tasks."""
    sets: dict[tuple, list[Group]] = {}
    for g in groups:
        sets.setdefault((g.metric_definitions, g.mode, g.prompt_format), []).append(g)
    out = []
    for gs in sets.values():
        if len({(g.model_spec, g.model_hash) for g in gs}) < 2:
            continue
        labels: list[str] = []
        by_label: list[dict[str, dict]] = []
        for g in gs:
            rows = {row["run"].label: row for row in ov[g.gid] if not row["run"].reference}
            by_label.append(rows)
            labels += [lab for lab in rows if lab not in labels]
        table = []
        for lab in labels:
            cells = []
            for rows in by_label:
                row = rows.get(lab)
                o = row["overall"] if row else None
                cells.append(None if row is None else {
                    "rank": row["rank"], "tied": row["tied"],
                    "value": o["value"] if o else None, "lo": o["lo"] if o else None,
                    "hi": o["hi"] if o else None, "n_tasks": o["n_tasks"] if o else 0})
            table.append({"label": lab, "cells": cells})
        agreement = []
        for i in range(len(gs)):
            for j in range(i + 1, len(gs)):
                common = [t for t in table if all(t["cells"][k] and t["cells"][k]["value"] is not None
                                                  for k in (i, j))]
                # rank 1 as each model ranks all its runs, among the editors both ranked
                leaders = [sorted(t["label"] for t in common if t["cells"][k]["rank"] == 1) for k in (i, j)]
                agreement.append({
                    "a": gs[i].model_spec, "b": gs[j].model_spec, "n": len(common),
                    "tau": kendall_tau([t["cells"][i]["value"] for t in common],
                                       [t["cells"][j]["value"] for t in common]),
                    "leaders": leaders, "same_leaders": bool(common) and leaders[0] == leaders[1]})
        out.append({"models": [g.model_spec for g in gs], "headings": [g.heading for g in gs],
                    "gids": [g.gid for g in gs], "rank_key": gs[0].rank_key, "rows": table,
                    "agreement": agreement})
    return out


# --------------------------------------------------------------------------------------------
# Held-out view
# --------------------------------------------------------------------------------------------

def heldout_tasks(g: Group) -> list[str]:
    """Tasks of the group that a learned run held out of its training (or that a run flags
    held out): the tasks on which learned editors meet something new."""
    out = []
    for t in g.tasks:
        have = [r for r in g.runs if t in r.summary["tasks"]]
        if any(r.holdout(t) for r in have) or any(r.train_tasks is not None and r.unseen(t) for r in have):
            out.append(t)
    return out


def holdout_view(g: Group) -> dict:
    """Every run on the held-out tasks (a learned run only where it held the task out; an editor
    that does not train everywhere), next to its mean on the group's other tasks."""
    tasks = heldout_tasks(g)
    cols = [c for c in g.columns if c.task in tasks]
    others = [t for t in g.tasks if t not in tasks]
    metrics = ([g.rank_key] if g.rank_key else []) + [m for m in g.mean_metrics
                                                     if any(m in g.task_metrics[t] for t in tasks)]
    rows = []
    for r in g.runs:
        seen = [t for t in tasks if t in r.summary["tasks"] and not r.unseen(t)]
        cells = [g.cell(r, c) if c.task in r.summary["tasks"] and r.unseen(c.task) else None for c in cols]
        trained_cols = [c.task in seen for c in cols]

        def value(t: str, m: str) -> float | None:
            if m in COMPOSITES:
                return (g.composite.get((r.slug, t, m)) or {}).get("post")
            return (r.stat(t, m) or {}).get("post")

        held = {m: _mean([value(t, m) for t in tasks if t in r.summary["tasks"] and r.unseen(t)]) for m in metrics}
        other = {m: _mean([value(t, m) for t in others if t in r.summary["tasks"]]) for m in metrics}
        gap = {m: (held[m] - other[m]) if held[m] is not None and other[m] is not None else None for m in metrics}
        if r.train_tasks is None:
            status = "does not train: every task held out"
        else:
            status = "trained on " + (", ".join(r.train_tasks) or "nothing")
        rows.append({"run": r, "cells": cells, "trained": trained_cols, "heldout": held, "other": other,
                     "gap": gap, "status": status, "unseen_tasks": [t for t in r.tasks if r.unseen(t)],
                     "trained_on": r.train_tasks})
    rows.sort(key=lambda row: (row["run"].reference, -((row["heldout"].get(g.rank_key) if g.rank_key else None) or -1)))
    _best_flags(rows, len(cols))
    return {"tasks": tasks, "others": others, "metrics": metrics, "columns": cols, "rows": rows,
            "rule": HOLDOUT_RULE}


def protocol_gap(g: Group) -> dict:
    """Teacher-forced against in-the-wild post-edit means, per run, task and metric pair, with
    the gap (teacher-forced minus wild, in points): how much feeding the answer overstates."""
    pairs = [(tf, wild) for wild, tf in WILD_COUNTERPART.items()]
    cols = [(t, tf, wild) for t in g.tasks for tf, wild in pairs
            if any(r.stat(t, tf) is not None and r.stat(t, wild) is not None for r in g.runs)]
    rows = []
    for r in g.runs:
        cells = []
        for t, tf, wild in cols:
            a, b = r.stat(t, tf), r.stat(t, wild)
            if a is None or b is None or a["post"] is None or b["post"] is None:
                cells.append(None)
            else:
                cells.append({"tf": a["post"], "wild": b["post"], "gap": a["post"] - b["post"], "n": b["n"]})
        if any(c is not None for c in cells):
            rows.append({"run": r, "cells": cells})
    return {"columns": cols, "rows": rows, "abbr": {tf: METRIC_BY_NAME[tf].abbr for _, tf, _ in cols}}


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------

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

    def compare(self, a: Run, b: Run, c: Column) -> dict | None:
        """`a` minus `b` in column `c` over their shared cases, or None without shared cases."""
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
        if g.rank_key is None or not g.rank_tasks:
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
                    cells[j][i] = {**c, "diff": -c["diff"] if c["diff"] is not None else None,
                                   "lo": -c["hi"] if c["hi"] is not None else None,
                                   "hi": -c["lo"] if c["lo"] is not None else None, "sig": -c["sig"],
                                   "mark": {"▲": "▼", "▼": "▲", "△": "▽", "▽": "△"}.get(c["mark"], c["mark"])}
    out["n_tests"] = sum(1 for c in family if c.get("p") is not None)
    return out


def verdicts(g: Group, ov: list[dict], ho: dict, cmp: dict, pairing: Pairing | None = None) -> list[str]:
    """One line per held-out task (or, without one, for the overall ranking): the best run by
    Score, its interval, ties, and its lead over the baseline with the paired interval."""
    if g.rank_key is None:
        return []
    label = COMPOSITES[g.rank_key][0]
    pairing = pairing or Pairing(g)
    base = cmp.get("base")
    lines = []

    def lead(best: Run, cell: dict | None, what: str) -> str:
        if base is None:
            return "no baseline chosen" if not cmp.get("baseline") or cmp.get("baseline") == "none" \
                else "the baseline is not in this group"
        if best is base:
            return f"it is the baseline ({base.label})"
        if cell is None or cell.get("diff") is None:
            return f"no paired comparison with the baseline {base.label} (too few shared cases)"
        ci = "" if cell["lo"] is None else f", 95% interval [{cell['lo']:+.1f}, {cell['hi']:+.1f}]"
        word = "ahead of" if cell["diff"] >= 0 else "behind"
        sig = ("significant (the interval excludes 0)" if cell["sig"] != 0
               else "not significant (the interval contains 0)") if cell["lo"] is not None else "not tested"
        return (f"{word} the baseline {base.label} by {abs(cell['diff']):.1f} points on {what}"
                f"{ci}, n={cell['n']}: {sig}")

    def interval(c: dict, value_key: str = "post") -> str:
        v = c[value_key]
        return f"{v:.1f}" + ("" if c.get("lo") is None else f" [{c['lo']:.1f}, {c['hi']:.1f}]")

    for t in ho["tasks"]:
        key = g.rank_key
        cands = [(r, g.composite.get((r.slug, t, key))) for r in g.runs
                 if _competes(r) and t in r.summary["tasks"] and r.unseen(t)]
        cands = [(r, c) for r, c in cands if c is not None]
        if not cands:
            continue
        best, bc = max(cands, key=lambda rc: rc[1]["post"])
        tied = [r.label for r, c in cands if r is not best and c["hi"] is not None and bc["lo"] is not None
                and c["hi"] >= bc["lo"]]
        col = Column(t, key, COMPOSITES[key][1])
        cell = pairing.compare(best, base, col) if base is not None and best is not base else None
        lines.append(f"Best on the held-out task {t}: {best.label} ({label} {interval(bc)})"
                     + (f", tied with {', '.join(tied)} (overlapping intervals)" if tied else "")
                     + f"; {lead(best, cell, f'{t} {label}')}.")
    if not lines:
        ranked = [row for row in ov if row["rank"] is not None]
        if ranked:
            top = ranked[0]
            tied = [row["run"].label for row in ranked[1:] if row["rank"] == top["rank"]]
            cell = pairing.compare_overall(top["run"], base) if base is not None and top["run"] is not base else None
            lines.append(f"Best overall: {top['run'].label} ({label} {interval(top['overall'], 'value')}, mean over "
                         f"{len(g.rank_tasks)} task{'s' if len(g.rank_tasks) != 1 else ''})"
                         + (f", tied with {', '.join(tied)} (overlapping intervals)" if tied else "")
                         + f"; {lead(top['run'], cell, 'the mean ' + label)}.")
    return lines


CURVE_METRICS = ("reliability", "generality", "locality", "wild_reliability", "wild_generality", "wild_locality")


def sequential_curves(g: Group) -> dict:
    """A sequential group's checkpoints: per task and metric, each run's post-edit mean after
    each number of edits, starting from the unedited model at 0 edits (summary.json
    `sequential.checkpoints`); and per regression task and metric, the suite's value after each
    checkpoint (its `before` at 0 edits). Percent metrics are in [0, 100]; a regression
    metric's series has `unit` = None (its own scale)."""
    series: dict[tuple[str, str], dict] = {}

    def add(key: tuple[str, str], percent: bool, run: Run, n: int, v) -> None:
        v = finite_or_none(v)
        if v is None:
            return
        entry = series.setdefault(key, {"task": key[0], "metric": key[1], "percent": percent, "runs": {}})
        entry["runs"].setdefault(id(run), (run, {}))[1][n] = v

    for r in g.runs:
        for cp in r.checkpoints:
            n = int(cp["n_edits"])
            for t, ms in (cp.get("tasks") or {}).items():
                if not isinstance(ms, dict):
                    continue
                for m in CURVE_METRICS:
                    s = ms.get(m)
                    if isinstance(s, dict):
                        add((t, m), True, r, 0, s.get("pre"))
                        add((t, m), True, r, n, s.get("post"))
            for lm_task, ms in (cp.get("regression") or {}).items():
                for m, s in (ms or {}).items():
                    if isinstance(s, dict):
                        add((lm_task, m), False, r, 0, s.get("before"))
                        add((lm_task, m), False, r, n, s.get("after"))
    out = []
    for (t, m), e in series.items():
        runs = [(r, sorted(pts.items())) for r, pts in e["runs"].values()]
        out.append({"task": t, "metric": m, "percent": e["percent"], "regression": not e["percent"], "runs": runs})
    # edit metrics first (task by task, in CURVE_METRICS order), then the regression suite
    order = {m: i for i, m in enumerate(CURVE_METRICS)}
    out.sort(key=lambda x: (x["regression"], x["task"], order.get(x["metric"], len(order)), x["metric"]))
    return {"series": out}


# --------------------------------------------------------------------------------------------
# Drill-down rows
# --------------------------------------------------------------------------------------------

def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _probes(rec: dict, case: dict) -> list[dict]:
    """One row per probe of the case (prompt, rephrases, locality, portability) with the
    expected answer and the pre- and post-edit predictions."""
    preds = rec.get("predictions") if isinstance(rec.get("predictions"), dict) else {}
    pre = preds.get("pre") if isinstance(preds.get("pre"), dict) else {}
    post = preds.get("post") if isinstance(preds.get("post"), dict) else {}
    wild = rec.get("wild") if isinstance(rec.get("wild"), dict) else {}
    gens = wild.get("generations") if isinstance(wild.get("generations"), dict) else {}
    gen_pre = gens.get("pre") if isinstance(gens.get("pre"), dict) else {}
    gen_post = gens.get("post") if isinstance(gens.get("post"), dict) else {}

    def pick(d, key, i):
        v = d.get(key)
        if isinstance(v, list):
            v = v[i] if i < len(v) else None
        elif i != 0:
            v = None
        return v.get("text") if isinstance(v, dict) else v  # a generation: its text

    def row(kind, slot, i, prompt, expected):
        return {"kind": kind, "prompt": prompt, "expected": expected, "pre": pick(pre, slot, i),
                "post": pick(post, slot, i), "gen_pre": pick(gen_pre, slot, i),
                "gen_post": pick(gen_post, slot, i)}

    n = {slot: max(len(_as_list(pre.get(slot))), len(_as_list(post.get(slot))),
                   len(_as_list(gen_post.get(slot)))) for slot in ("rephrase", "locality", "portability")}
    out = [row("prompt", "prompt", 0, case.get("prompt"), case.get("target_new"))]
    rephrases = _as_list(case.get("rephrase_prompts"))
    for i in range(max(len(rephrases), n["rephrase"])):
        out.append(row("rephrase", "rephrase", i, rephrases[i] if i < len(rephrases) else None, case.get("target_new")))
    for kind in ("locality", "portability"):
        qs = _as_list(case.get(kind))
        for i in range(max(len(qs), n[kind])):
            q = qs[i] if i < len(qs) else {}
            q = q if isinstance(q, dict) else {"prompt": q, "answer": None}
            out.append(row(kind, kind, i, q.get("prompt"), q.get("answer")))
    return out


def failure_reasons(rec: dict) -> list[tuple[str, str]]:
    """Why a case fails (FAILURE_RULE): [(kind, text)], kind 'error', 'edit' or 'broke'; empty
    when it passes."""
    if rec.get("error"):
        return [("error", "error")]
    post = rec.get("post") if isinstance(rec.get("post"), dict) else None
    if post is None:
        return [("error", "no post-edit result")]
    pre = rec.get("pre") if isinstance(rec.get("pre"), dict) else {}
    out = []
    rel_key = "reliability" if "reliability" in post else "wild_reliability"
    rel = finite_or_none(post.get(rel_key))
    if rel is not None and rel < 1:
        out.append(("edit", f"{METRIC_ABBR[rel_key]} {rel:.3g} < 1"))
    for m in LOCALITY_TYPE:
        a, b = finite_or_none(pre.get(m)), finite_or_none(post.get(m))
        if a is not None and b is not None and b < a - 1e-9:
            out.append(("broke", f"{METRIC_ABBR[m]} dropped {a:.3g} → {b:.3g}"))
    return out


def _score_row(m: str, pre: dict, post: dict | None, dropped: bool) -> tuple:
    """(metric, pre, post, flagged): flagged when the value makes the case fail (FAILURE_RULE)."""
    a, b = finite_or_none(pre.get(m)), finite_or_none((post or {}).get(m))
    rel_key = "reliability" if "reliability" in (post or {}) else "wild_reliability"
    missed = m == rel_key and b is not None and b < 1
    return m, a, b, dropped or missed


def case_rows(run: Run, task: str, case_text: bool = True) -> list[dict]:
    """Per-case rows of the drill-down. case_text=False leaves out everything that comes from
    the data records (prompts, targets, ground truths, probe texts), keeping case ids, the
    model's predictions and the scores: for leaderboards published without the data."""
    rows = []
    for rec in run.cases:
        if str(rec.get("task")) != task:
            continue
        case = rec.get("case") if case_text and isinstance(rec.get("case"), dict) else {}
        pre = rec.get("pre") if isinstance(rec.get("pre"), dict) else {}
        post = rec.get("post") if isinstance(rec.get("post"), dict) else None
        reasons = failure_reasons(rec)
        metrics = [m for m in ALL_METRICS if m in pre or (post and m in post)]
        metrics += [m for m in list(pre) + list(post or {}) if m not in metrics]
        metrics = list(dict.fromkeys(metrics))
        dropped = {m for m in LOCALITY_TYPE if any(k == "broke" and t.startswith(METRIC_ABBR[m] + " ")
                                                   for k, t in reasons)}
        rows.append({"case_id": rec.get("case_id"), "case": case, "error": rec.get("error"),
                     "failed": bool(reasons), "reasons": reasons,
                     "kinds": sorted({k for k, _ in reasons}),
                     "scores": [_score_row(m, pre, post, m in dropped) for m in metrics],
                     "probes": _probes(rec, case)})
    return rows


def segments(columns: list[Column]) -> list[tuple[str, str, int]]:
    """Runs of consecutive columns of one (task, family): the top header row's cells."""
    out: list[tuple[str, str, int]] = []
    for c in columns:
        if out and out[-1][0] == c.task and out[-1][1] == c.family:
            out[-1] = (c.task, c.family, out[-1][2] + 1)
        else:
            out.append((c.task, c.family, 1))
    return out
