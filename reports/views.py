"""What the report shows, as plain data for the templates and the exports: the groups of runs
that may be ranked together, and per group the overview, the held-out view and the baseline
comparison; plus the per-case rows of the drill-down pages.

Runs of different models (``config.model.spec`` + ``source_hash``) or different metric definitions
(``config.metric_definitions``) are never ranked together: each combination gets its own group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.core.metrics import METRIC_BY_NAME, TOKEN_METRICS, WILD_COUNTERPART
from reports.runs import Run, finite_or_none
from reports.stats import paired_comparison

# The tables show the token metrics only; the CounterFact ones are not columns yet.
METRICS = TOKEN_METRICS
METRIC_ABBR = {m: METRIC_BY_NAME[m].abbr for m in METRICS}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Group:
    model_spec: str
    model_hash: str
    metric_definitions: str
    runs: list[Run]
    gid: str = ""
    tasks: list[str] = field(default_factory=list)
    task_metrics: dict[str, list[str]] = field(default_factory=dict)
    columns: list[tuple[str, str]] = field(default_factory=list)  # (task, metric)
    mean_metrics: list[str] = field(default_factory=list)

    @property
    def heading(self) -> str:
        h = f" (source sha256 {self.model_hash[:12]})" if self.model_hash else " (no source hash)"
        return f"Model {self.model_spec}{h} · metric definitions {self.metric_definitions}"

    def holdout_status(self, task: str) -> str:
        """'all', 'some' or 'none' of the group's runs that have the task hold it out."""
        flags = [r.holdout(task) for r in self.runs if task in r.summary["tasks"]]
        if flags and all(flags):
            return "all"
        return "some" if any(flags) else "none"


def make_groups(runs: list[Run]) -> list[Group]:
    """One group per (model, source hash, metric definitions), in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = (r.model_spec, r.model_hash, r.metric_definitions)
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
            g.task_metrics[t] = [m for m in METRICS
                                 if any(r.stat(t, m) is not None for r in g.runs)]
            g.columns += [(t, m) for m in g.task_metrics[t]]
        g.mean_metrics = [m for m in METRICS if any(m in g.task_metrics[t] for t in g.tasks)]
    return out


def overview(g: Group) -> list[dict]:
    """One row per run, ranked by the mean over metrics of the per-metric mean across tasks."""
    rows = []
    for r in g.runs:
        cells = [r.stat(t, m) for t, m in g.columns]
        means = {m: _mean([(r.stat(t, m) or {}).get("post") for t in r.tasks]) for m in g.mean_metrics}
        means["all"] = _mean(list(means.values()))
        missing = [t for t in g.tasks if t not in r.summary["tasks"]]
        rows.append({"run": r, "cells": cells, "means": means, "missing_tasks": missing})
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["means"]["all"] is None,
                                                  -(rows[i]["means"]["all"] or 0.0)))
    rows = [rows[i] for i in order]
    for k, row in enumerate(rows, 1):
        row["rank"] = k if row["means"]["all"] is not None else None
    return rows


def holdout_view(g: Group) -> dict:
    """The held-out tasks' scores and, per metric, their mean against the in-distribution mean."""
    tasks = [t for t in g.tasks if any(r.holdout(t) for r in g.runs if t in r.summary["tasks"])]
    metrics = [m for m in g.mean_metrics if any(m in g.task_metrics[t] for t in tasks)]
    cols = [(t, m) for t in tasks for m in g.task_metrics[t]]
    rows = []
    for r in g.runs:
        ho = [t for t in r.tasks if r.holdout(t)]
        ind = [t for t in r.tasks if not r.holdout(t)]
        cells = [r.stat(t, m) if t in ho else None for t, m in cols]
        held = {m: _mean([(r.stat(t, m) or {}).get("post") for t in ho]) for m in metrics}
        indist = {m: _mean([(r.stat(t, m) or {}).get("post") for t in ind]) for m in metrics}
        gap = {m: (held[m] - indist[m]) if held[m] is not None and indist[m] is not None else None
               for m in metrics}
        rows.append({"run": r, "cells": cells, "heldout": held, "indist": indist, "gap": gap,
                     "holdout_tasks": ho, "indist_tasks": ind})
    return {"tasks": tasks, "metrics": metrics, "columns": cols, "rows": rows}


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


def comparison(g: Group, baseline: str | None) -> dict:
    """Every other run of the group against the most recent run of editor `baseline`, per
    (task, metric) over the cases both finished (see reports.stats.paired_comparison)."""
    out: dict[str, Any] = {"baseline_editor": baseline, "base": None, "note": "", "rows": [],
                           "columns": list(g.columns)}
    if baseline is None:
        out["note"] = "No baseline chosen."
        return out
    cands = [r for r in g.runs if r.editor == baseline]
    if not cands:
        out["note"] = (f"Baseline editor '{baseline}' is not among the runs of this group; "
                       "no comparison.")
        return out
    base = max(cands, key=lambda r: r.created)  # most recent run of the baseline editor
    out["base"] = base
    if len(cands) > 1:
        out["note"] = (f"{len(cands)} runs of '{baseline}' in this group; comparing against the "
                       f"most recent one, {base.label}.")
    if not base.cases:
        out["note"] = (out["note"] + " " if out["note"] else "") + \
            "The baseline run has no cases.jsonl records; no paired test possible."
    bposts = base.case_posts()
    for r in g.runs:
        if r is base:
            continue
        posts = r.case_posts()
        cells = []
        for t, m in g.columns:
            keys = sorted(k for k in posts.keys() & bposts.keys()
                          if k[0] == t and finite_or_none(posts[k].get(m)) is not None
                          and finite_or_none(bposts[k].get(m)) is not None)
            if not keys:
                cells.append(None)
                continue
            cells.append(paired_comparison(np.array([float(posts[k][m]) for k in keys]),
                                           np.array([float(bposts[k][m]) for k in keys])))
        out["rows"].append({"run": r, "cells": cells})
    return out


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

    out = [row("prompt", "prompt", 0, case.get("prompt"), case.get("target_new"))]
    for i, q in enumerate(_as_list(case.get("rephrase_prompts"))):
        out.append(row("rephrase", "rephrase", i, q, case.get("target_new")))
    for kind in ("locality", "portability"):
        for i, q in enumerate(_as_list(case.get(kind))):
            q = q if isinstance(q, dict) else {"prompt": q, "answer": None}
            out.append(row(kind, kind, i, q.get("prompt"), q.get("answer")))
    return out


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
        rel = finite_or_none((post or {}).get("reliability"))
        error = rec.get("error")
        failed = bool(error) or post is None or (rel is not None and rel < 1)
        metrics = [m for m in METRICS if m in pre or (post and m in post)]
        metrics += [m for m in list(pre) + list(post or {}) if m not in metrics]
        metrics = list(dict.fromkeys(metrics))
        rows.append({"case_id": rec.get("case_id"), "case": case, "error": error, "failed": failed,
                     "scores": [(m, finite_or_none(pre.get(m)), finite_or_none((post or {}).get(m)))
                                for m in metrics],
                     "probes": _probes(rec, case)})
    return rows
