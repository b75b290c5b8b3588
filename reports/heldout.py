"""The held-out view: every run on the tasks learned editors never trained on, beside its mean on
the group's other tasks; and the teacher-forced against in-the-wild gap."""

from __future__ import annotations

from bench.core.metrics import METRIC_BY_NAME, WILD_COUNTERPART
from reports.groups import COMPOSITES, Group, mean_of
from reports.ranking import best_flags

HOLDOUT_RULE = ("A task is held out for a run when the run's editor never trained on it: a learned "
                "editor (one whose run records its training tasks, such as MEND and InstructEdit) "
                "sees only the tasks it trained on, and an editor that does not train (FT, ROME, the "
                "no-edit reference) saw no task, so every task is held out for it. Every run is "
                "listed; \u201ctrained on\u201d marks a task a learned editor trained on.")


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

        held = {m: mean_of([value(t, m) for t in tasks if t in r.summary["tasks"] and r.unseen(t)]) for m in metrics}
        other = {m: mean_of([value(t, m) for t in others if t in r.summary["tasks"]]) for m in metrics}
        gap = {m: (held[m] - other[m]) if held[m] is not None and other[m] is not None else None for m in metrics}
        if r.train_tasks is None:
            status = "does not train: every task held out"
        else:
            status = "trained on " + (", ".join(r.train_tasks) or "nothing")
        rows.append({"run": r, "cells": cells, "trained": trained_cols, "heldout": held, "other": other,
                     "gap": gap, "status": status, "unseen_tasks": [t for t in r.tasks if r.unseen(t)],
                     "trained_on": r.train_tasks})
    rows.sort(key=lambda row: (row["run"].reference, -((row["heldout"].get(g.rank_key) if g.rank_key else None) or -1)))
    best_flags(g, rows, len(cols))
    return {"tasks": tasks, "others": others, "metrics": metrics, "columns": cols, "rows": rows,
            "rule": HOLDOUT_RULE, "note": "" if tasks else no_heldout_note(g)}


def no_heldout_note(g: Group) -> str:
    """What a group without a held-out task says: which learned runs trained on its tasks (so
    their results are on tasks they trained on), or that no run records training tasks."""
    learned = [r for r in g.runs if r.train_tasks is not None]
    plain = ("Every editor here that does not train saw no task, so the overview is on unseen tasks "
             "for it.")
    if not learned:
        return ("No task of this group is held out: no run records training tasks or a held-out task. " + plain)
    who = "; ".join(f"{r.label} trained on {', '.join(r.train_tasks) or 'nothing'}" for r in learned)
    return (f"No task of this group is held out for its learned editors ({who}): every task here is one "
            f"they trained on, so their results are not on held-out tasks (marked \u201ctrained on\u201d "
            f"beside their names). " + plain)


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
