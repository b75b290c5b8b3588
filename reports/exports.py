"""The leaderboard in machine-readable form: leaderboard.json and leaderboard.csv (the overview
table; the Markdown is reports.markdown). Every metric family the runs hold (teacher forced,
CounterFact's probability scores, in the wild) and the composites reach all of them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from reports.matrix import matrix_json
from reports.stats import ALPHA
from reports.cases import FAILURE_RULE
from reports.groups import COMPOSITES, METRICS, Group
from reports.ranking import RANK_RULE

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MARK_RULE = ("Paired comparison over the cases both runs finished (matched by task and case id): the "
             "difference in points with its 95% bootstrap interval (2,000 resamples of the shared cases) and "
             "a p-value read off the same resamples, so p < {alpha} exactly when the interval excludes 0. "
             "▲/▼: the interval excludes 0 and the comparison survives Holm's adjustment over the {n} "
             "comparisons of this table; △/▽: it excludes 0 but does not survive the adjustment; · the "
             "interval contains 0 (or fewer than {min_pairs} shared cases: no test). Sequential runs of "
             "different lengths are not paired (a case's score is read after all of its run's edits): "
             "their cells are empty.")
PEAK_MEMORY_NOTE = ("peak memory: the largest the run recorded (summary.json `memory`: peak resident memory "
                    "on CPU, peak CUDA allocation on GPU), – where it recorded none (runs made before "
                    "2026-12-07); training: a learned editor's training time and steps, – for an editor "
                    "that does not train")


def _r(x: float | None, nd: int = 4) -> float | None:
    """`x` rounded for the exports; NaN becomes None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def _cell_json(s: dict | None) -> dict | None:
    if s is None:
        return None
    return {"pre": _r(s.get("pre")), "post": _r(s.get("post")), "ci": [_r(s.get("lo")), _r(s.get("hi"))],
            "n": s.get("n")}


def _cmp_json(c: dict) -> dict:
    return {"diff": _r(c["diff"]), "ci": [_r(c["lo"]), _r(c["hi"])], "p": _r(c["p"], 6),
            "p_holm": _r(c.get("p_holm"), 6), "mark": c.get("mark", ""), "n": c["n"]}


def leaderboard_json(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict,
                     cmp: dict, pg: dict | None = None, pw: dict | None = None, vd: dict | None = None,
                     mx: dict | None = None, xm: list | None = None, sq: dict | None = None) -> dict:
    """The content of leaderboard.json. `ov`, `ho`, `cmp`, `pg`, `pw` and `vd` map a group's gid to
    its overview, held-out view, baseline comparison, teacher-forced vs wild gap, pairwise
    comparisons and verdicts (reports.views); `mx` is the leave-one-task-out matrix, if any
    (reports.matrix)."""
    doc: dict[str, Any] = {"title": title, "baseline": baseline, "alpha": ALPHA, "ranking": RANK_RULE,
                           "failure_rule": FAILURE_RULE, "groups": []}
    if mx is not None:
        doc["holdout_matrix"] = matrix_json(mx)
    if xm:
        doc["cross_model"] = xm
    for g in groups:
        gd: dict[str, Any] = {
            "heading": g.heading,
            "model": {"spec": g.model_spec, "source_hash": g.model_hash},
            "metric_definitions": g.metric_definitions, "mode": g.mode, "prompt_format": g.prompt_format,
            "verdicts": (vd or {}).get(g.gid, []),
            "ranking_composite": g.rank_key,
            "composites": {k: {"label": v[0], "family": v[1], "terms": list(v[2])} for k, v in COMPOSITES.items()},
            "tasks": [{"name": t, "holdout": g.holdout_status(t), "held_out_by": g.heldout_for(t),
                       "metrics": g.task_metrics[t]} for t in g.tasks],
            "columns": [{"task": c.task, "key": c.key, "family": c.family, "label": c.abbr} for c in g.columns],
            "rows": [_row_json(g, row) for row in ov[g.gid]],
            "holdout": _holdout_json(ho[g.gid]),
            "baseline_comparison": _baseline_json(g, cmp[g.gid]),
            "pairwise": _pairwise_json((pw or {}).get(g.gid)),
            "protocol_gap": _gap_json((pg or {}).get(g.gid)),
        }
        if (sq or {}).get(g.gid):
            gd["sequential"] = checkpoints_json(sq[g.gid])
        doc["groups"].append(gd)
    return doc


def _row_json(g: Group, row: dict) -> dict:
    """One run's row of the overview: rank, status, provenance, look, Score, cells and cost."""
    r = row["run"]
    tasks: dict[str, dict] = {}
    for c, s in zip(g.columns, row["cells"]):
        if s is not None:
            tasks.setdefault(c.task, {})[c.key] = _cell_json(s)
    o = row["overall"]
    return {
        "rank": row["rank"], "tied": row["tied"], "letters": row["letters"], "reference": r.reference,
        "complete": r.complete, "status": r.incomplete_mark or row["fewer"] or "complete",
        "equal_footing": not row["fewer"],
        "fewer_cases": [{"task": t, "finished": n, "full": full} for t, n, full in row["fewer_cases"]],
        "cases": {"finished": r.finished_cases, "planned": r.planned_cases},
        "summary_rebuilt": r.summary_rebuilt, "run": r.label,
        "editor": r.editor, "data": r.data, "run_dir": r.name, "created": r.created, "mode": r.mode,
        "command": r.command, "git_commit": r.git_commit, "look": {
            "family": r.family, "color": r.color, "marker": r.marker, "dash": r.dash, "variant": r.variant},
        "holdout_tasks": [t for t in r.tasks if r.unseen(t)], "trained_on": r.train_tasks,
        "score": None if o is None else {"composite": g.rank_key, "value": _r(o["value"]),
                                         "ci": [_r(o["lo"]), _r(o["hi"])], "n_tasks": o["n_tasks"]},
        "tasks": tasks, "mean": {m: _r(v) for m, v in row["means"].items()},
        "cost": {"median_edit_s": _r(row["cost"]["edit_s"]), "peak_memory_mb": _r(row["cost"]["peak_mb"]),
                 "training": row["cost"]["training"]}}


def _holdout_json(h: dict) -> dict:
    return {"tasks": h["tasks"], "rule": h["rule"], "note": h["note"], "rows": [
        {"run": row["run"].label, "reference": row["run"].reference, "trained_on": row["trained_on"],
         "holdout_tasks": row["unseen_tasks"], "status": row["status"],
         "tasks": {t: {c.key: _cell_json(s) for c, s in zip(h["columns"], row["cells"])
                       if c.task == t and s is not None} for t in h["tasks"]},
         "heldout_mean": {m: _r(v) for m, v in row["heldout"].items()},
         "other_tasks_mean": {m: _r(v) for m, v in row["other"].items()},
         "gap": {m: _r(v) for m, v in row["gap"].items()}} for row in h["rows"]]}


def _baseline_json(g: Group, c: dict) -> dict:
    comps = []
    for row in c["rows"]:
        run = {"run": row["run"].label, "reference": row["run"].reference}
        for col, cell in zip(g.columns, row["cells"]):
            if cell is not None:
                comps.append({**run, "task": col.task, "metric": col.key, **_cmp_json(cell),
                              "editor_mean": _r(cell.get("editor_mean")), "baseline_mean": _r(cell.get("base_mean"))})
        if row["overall"] is not None:
            comps.append({**run, "task": "all", "metric": g.rank_key, **_cmp_json(row["overall"])})
    return {"baseline_run": c["base"].label if c["base"] else None,
            "baseline_run_dir": c["base"].name if c["base"] else None, "note": c["note"],
            "test": "paired bootstrap of the shared cases (2,000 resamples); p from the same resamples; "
                    "Holm-adjusted marks", "n_tests": c["n_tests"], "comparisons": comps}


def _pairwise_json(p: dict | None) -> dict:
    pairs = []
    if p:
        runs = p["runs"]
        for mat in p["matrices"]:
            for i, a in enumerate(runs):
                for j, b in enumerate(runs):
                    cell = mat["cells"][i][j]
                    if j > i and cell is not None:
                        pairs.append({"a": a.label, "b": b.label, "task": mat["task"] or "all",
                                      "composite": p["key"], **_cmp_json(cell)})
    return {"n_tests": p["n_tests"] if p else 0, "comparisons": pairs}


def _gap_json(gap: dict | None) -> list[dict]:
    gap = gap or {"rows": []}
    return [{"run": row["run"].label, "task": t, "metric": tf, "wild_metric": wild, "teacher_forced": _r(x["tf"]),
             "wild": _r(x["wild"]), "gap": _r(x["gap"]), "n": x["n"]}
            for row in gap["rows"] for (t, tf, wild), x in zip(gap["columns"], row["cells"]) if x is not None]


def checkpoints_json(table: dict) -> dict:
    """A sequential group's checkpoint table (reports.sequential.checkpoint_table) in
    leaderboard.json."""
    return {"rule": table["rule"], "trained": table["trained"],
            "tasks": [{"task": t["task"], "metrics": t["metrics"], "runs": [
                {"run": e["run"].label, "run_dir": e["run"].name, "pre": {m: _r(v) for m, v in e["pre"].items()},
                 "checkpoints": [{"n_edits": c["n_edits"],
                                  "metrics": {m: {"post": _r(x["post"]), "ci": [_r(x["lo"]), _r(x["hi"])], "n": x["n"]}
                                              for m, x in c["cells"].items()}} for c in e["checkpoints"]]}
                for e in t["runs"]]} for t in table["tasks"]],
            "regression": [{"task": e["task"], "metric": e["metric"], "runs": [
                {"run": x["run"].label, "run_dir": x["run"].name, "before": _r(x["before"], 6),
                 "checkpoints": [{"n_edits": c["n_edits"], "value": _r(c["value"], 6)} for c in x["checkpoints"]]}
                for x in e["runs"]]} for e in table["regression"]]}


def checkpoints_frame(groups: list[Group], sq: dict) -> pd.DataFrame:
    """Every checkpoint of every sequential group, one row per (run, task, edits, metric): the rows
    of checkpoints.csv. n_edits 0 is the unedited model (post = its value)."""
    cols = ["group", "run", "editor", "run_dir", "task", "n_edits", "metric", "post", "ci_lo", "ci_hi", "n"]
    records = []
    for g in groups:
        table = sq.get(g.gid)
        if not table:
            continue
        for t in table["tasks"]:
            for e in t["runs"]:
                r = e["run"]
                base = {"group": g.heading, "run": r.label, "editor": r.editor, "run_dir": r.name, "task": t["task"]}
                for m in t["metrics"]:
                    if e["pre"].get(m) is not None:
                        records.append({**base, "n_edits": 0, "metric": m, "post": _r(e["pre"][m])})
                for c in e["checkpoints"]:
                    for m, x in c["cells"].items():
                        records.append({**base, "n_edits": c["n_edits"], "metric": m, "post": _r(x["post"]),
                                        "ci_lo": _r(x["lo"]), "ci_hi": _r(x["hi"]), "n": x["n"]})
        for e in table["regression"]:
            for x in e["runs"]:
                r = x["run"]
                base = {"group": g.heading, "run": r.label, "editor": r.editor, "run_dir": r.name,
                        "task": e["task"], "metric": e["metric"]}
                if x["before"] is not None:
                    records.append({**base, "n_edits": 0, "post": _r(x["before"], 6)})
                for c in x["checkpoints"]:
                    records.append({**base, "n_edits": c["n_edits"], "post": _r(c["value"], 6)})
    df = pd.DataFrame.from_records(records, columns=cols)
    return df.astype({"n_edits": "Int64", "n": "Int64"})


def leaderboard_frame(groups: list[Group], ov: dict) -> pd.DataFrame:
    """The overview of every group as one table (the rows of leaderboard.csv)."""
    records, cols = [], ["group", "mode", "rank", "tied", "letters", "reference", "complete", "equal_footing",
                         "status", "finished_cases", "planned_cases", "run", "editor", "data", "model",
                         "source_hash", "metric_definitions", "run_dir", "git_commit", "command",
                         "score", "score/ci_lo", "score/ci_hi",
                         "median_edit_s", "peak_memory_mb", "train_time_s", "train_steps"]
    for g in groups:
        for c in g.columns:
            for name in (f"{c.task}/{c.key}", f"{c.task}/{c.key}/ci_lo", f"{c.task}/{c.key}/ci_hi", f"{c.task}/{c.key}/n"):
                if name not in cols:
                    cols.append(name)
    mean_cols = [f"mean/{m}" for m in METRICS]
    for g in groups:
        for row in ov[g.gid]:
            r = row["run"]
            o = row["overall"] or {}
            train = row["cost"]["training"] or {}
            rec: dict[str, Any] = {"group": g.heading, "mode": g.mode, "rank": row["rank"], "tied": row["tied"],
                                   "letters": row["letters"], "reference": r.reference, "complete": r.complete,
                                   "equal_footing": not row["fewer"],
                                   "status": r.incomplete_mark or row["fewer"] or "complete",
                                   "finished_cases": r.finished_cases, "git_commit": r.git_commit,
                                   "command": r.command, "train_time_s": _r(train.get("seconds")),
                                   "train_steps": train.get("steps"),
                                   "planned_cases": r.planned_cases, "run": r.label, "editor": r.editor, "data": r.data,
                                   "model": g.model_spec, "source_hash": g.model_hash,
                                   "metric_definitions": g.metric_definitions, "run_dir": r.name,
                                   "score": _r(o.get("value")), "score/ci_lo": _r(o.get("lo")),
                                   "score/ci_hi": _r(o.get("hi")), "median_edit_s": _r(row["cost"]["edit_s"]),
                                   "peak_memory_mb": _r(row["cost"]["peak_mb"])}
            for c, s in zip(g.columns, row["cells"]):
                if s is not None:
                    k = f"{c.task}/{c.key}"
                    rec[k], rec[f"{k}/ci_lo"], rec[f"{k}/ci_hi"], rec[f"{k}/n"] = \
                        _r(s["post"]), _r(s.get("lo")), _r(s.get("hi")), s.get("n")
            for m, v in row["means"].items():
                rec[f"mean/{m}"] = _r(v)
            records.append(rec)
    present = [c for c in mean_cols if any(c in rec for rec in records)]
    df = pd.DataFrame.from_records(records, columns=cols + present)
    return df.astype({c: "Int64" for c in df.columns if c.endswith("/n") or c in ("rank", "train_steps")})


def neutralise_csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with a quote; anything
    else (numbers, negative ones included, and missing values) unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_leaderboard_csv(path: Path, groups: list[Group], ov: dict, df: pd.DataFrame | None = None) -> None:
    """leaderboard.csv (or the frame `df`, e.g. checkpoints_frame), with every text cell (the
    header included) neutralised: run labels, directory names, model and task names come from
    the runs and may start with '='."""
    df = leaderboard_frame(groups, ov) if df is None else df
    for column in df.columns:
        if not pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column]):
            df[column] = df[column].map(neutralise_csv_cell)
    df.columns = [neutralise_csv_cell(c) for c in df.columns]
    df.to_csv(path, index=False)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
