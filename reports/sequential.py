"""Sequential groups: the checkpoints of runs whose edits accumulate (summary.json
`sequential.checkpoints`, docs/sequential.md).

One table holds them (checkpoint_table): per task, per run, the value of each metric after each
number of edits, with its 95% interval and n, and the pre-edit value (the unedited model); the
Score of each checkpoint (the harmonic mean of its reliability, generality and locality means,
without an interval: locality is read on the run's fixed probes, not per edited case, so the
three terms cannot be resampled together); and the lm-eval regression suite's value after each
checkpoint. The HTML table, leaderboard.json's `sequential`, checkpoints.csv, the Markdown and
the curves (sequential_curves) all read this one table.
"""

from __future__ import annotations

from reports.groups import COMPOSITES, Group
from reports.runs import Run, finite_or_none
from reports.stats import harmonic_mean

CURVE_METRICS = ("reliability", "generality", "locality", "wild_reliability", "wild_generality", "wild_locality")
SCORE_TERMS = {key: COMPOSITES[key][2] for key in ("score", "wild_score")}
CHECKPOINT_RULE = ("After each number of edits: every edit made so far, on the model holding them all "
                   "(reliability, generality: the edited cases; locality: the run's fixed probes), the "
                   "post-edit mean with its 95% bootstrap interval and n; \u201cbefore\u201d: the unedited "
                   "model (for the edited cases: all the run's cases). Score: the harmonic mean of the "
                   "checkpoint's reliability, generality and locality means (no interval: locality is read "
                   "on fixed probes, not per edited case).")


def metric_title(metric: str) -> str:
    """A metric's readable name: 'wild reliability', 'Score'."""
    return COMPOSITES[metric][0] if metric in COMPOSITES else metric.replace("_", " ")


def _cell(s: object) -> dict | None:
    if not isinstance(s, dict):
        return None
    ci = s.get("ci") if isinstance(s.get("ci"), (list, tuple)) and len(s.get("ci")) == 2 else (None, None)
    post = finite_or_none(s.get("post"))
    if post is None:
        return None
    n = s.get("n")
    return {"post": post, "lo": finite_or_none(ci[0]), "hi": finite_or_none(ci[1]),
            "n": n if isinstance(n, int) and not isinstance(n, bool) else None, "pre": finite_or_none(s.get("pre"))}


def _score(cells: dict, terms: tuple[str, ...], key: str) -> dict | None:
    vals = [cells.get(m) for m in terms]
    if any(v is None or v.get(key) is None for v in vals):
        return None
    return float(harmonic_mean([v[key] / 100 for v in vals])) * 100


def checkpoint_table(g: Group) -> dict:
    """{'tasks': [{'task', 'metrics', 'runs': [{'run', 'pre': {metric: value}, 'checkpoints':
    [{'n_edits', 'cells': {metric: {'post','lo','hi','n','pre'}}}]}]}], 'regression': [{'task',
    'metric', 'runs': [{'run', 'before', 'checkpoints': [{'n_edits', 'value'}]}]}]}: every
    checkpoint of every run of the group. 'pre' is the unedited model's value at the last
    checkpoint (its edited cases are all the run's cases; locality's probes are fixed)."""
    tasks: dict[str, dict] = {}
    regression: dict[tuple[str, str], dict] = {}
    for r in g.runs:
        for cp in r.checkpoints:
            n = int(cp["n_edits"])
            for t, ms in (cp.get("tasks") or {}).items():
                if not isinstance(ms, dict):
                    continue
                cells = {m: c for m in CURVE_METRICS if (c := _cell(ms.get(m))) is not None}
                for key, terms in SCORE_TERMS.items():
                    post = _score(cells, terms, "post")
                    if post is not None:
                        cells[key] = {"post": post, "lo": None, "hi": None, "n": None,
                                      "pre": _score(cells, terms, "pre")}
                if not cells:
                    continue
                task = tasks.setdefault(t, {"task": t, "metrics": [], "runs": {}})
                entry = task["runs"].setdefault(id(r), {"run": r, "pre": {}, "checkpoints": []})
                entry["checkpoints"].append({"n_edits": n, "cells": cells})
                for m, c in cells.items():
                    if m not in task["metrics"]:
                        task["metrics"].append(m)
                    if c.get("pre") is not None:
                        entry["pre"][m] = c["pre"]  # the last checkpoint's wins
            for lm_task, ms in (cp.get("regression") or {}).items():
                for m, s in (ms or {}).items():
                    after = finite_or_none(s.get("after")) if isinstance(s, dict) else None
                    if after is None:
                        continue
                    e = regression.setdefault((lm_task, m), {"task": lm_task, "metric": m, "runs": {}})
                    run = e["runs"].setdefault(id(r), {"run": r, "before": finite_or_none(s.get("before")),
                                                       "checkpoints": []})
                    run["checkpoints"].append({"n_edits": n, "value": after})
    order = {m: i for i, m in enumerate(("score",) + CURVE_METRICS[:3] + ("wild_score",) + CURVE_METRICS[3:])}
    out_tasks = []
    for t in [t for t in g.tasks if t in tasks] + [t for t in tasks if t not in g.tasks]:
        task = tasks[t]
        task["metrics"].sort(key=lambda m: order.get(m, len(order)))
        task["runs"] = [{**e, "checkpoints": sorted(e["checkpoints"], key=lambda c: c["n_edits"])}
                        for e in task["runs"].values()]
        out_tasks.append(task)
    regs = [{**e, "runs": [{**x, "checkpoints": sorted(x["checkpoints"], key=lambda c: c["n_edits"])}
                           for x in e["runs"].values()]} for e in regression.values()]
    return {"tasks": out_tasks, "regression": regs, "rule": CHECKPOINT_RULE,
            "trained": [{"run": r.label, "tasks": [t for t in tasks if not r.unseen(t)]}
                        for r in g.runs if r.train_tasks is not None and any(not r.unseen(t) for t in tasks)]}


def sequential_curves(g: Group, table: dict | None = None) -> dict:
    """The curves of checkpoint_table: per task and metric (the Score first), each run's points
    (n_edits, post, lo, hi) from its first checkpoint on and its pre-edit value (drawn apart, at
    0 edits); then per regression task and metric, the suite's value after each checkpoint and
    before editing (its own scale: `percent` False)."""
    table = table or checkpoint_table(g)
    series = []
    for task in table["tasks"]:
        for m in task["metrics"]:
            runs: list[tuple[Run, list[tuple[int, float, float | None, float | None]], float | None]] = []
            for e in task["runs"]:
                pts = [(c["n_edits"], c["cells"][m]["post"], c["cells"][m]["lo"], c["cells"][m]["hi"])
                       for c in e["checkpoints"] if m in c["cells"]]
                if pts:
                    runs.append((e["run"], pts, e["pre"].get(m)))
            if runs:
                series.append({"task": task["task"], "metric": m, "title": metric_title(m), "percent": True,
                               "regression": False, "runs": runs})
    for e in table["regression"]:
        runs = [(x["run"], [(c["n_edits"], c["value"], None, None) for c in x["checkpoints"]], x["before"])
                for x in e["runs"] if x["checkpoints"]]
        if runs:
            series.append({"task": e["task"], "metric": e["metric"], "title": metric_title(e["metric"]),
                           "percent": False, "regression": True, "runs": runs})
    return {"series": series}
