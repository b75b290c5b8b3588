"""Across models: groups that differ only in the model, each editor's rank and Score on each, and
whether the models rank the editors alike (Kendall's tau-b)."""

from __future__ import annotations

import math

from reports.groups import Group

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
