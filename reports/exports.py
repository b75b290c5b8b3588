"""The leaderboard in machine-readable form and as Markdown: leaderboard.json, leaderboard.csv
(the overview table) and leaderboard.md. Every metric family the runs hold (teacher forced,
CounterFact's probability scores, in the wild) and the composites reach all three."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from reports.matrix import matrix_json, metric_tables, training_table
from reports.stats import ALPHA, MIN_PAIRS, comparison_text, signed
from reports.cases import FAILURE_RULE
from reports.groups import COMPOSITES, FAMILIES, METRIC_ABBR, METRICS, Group
from reports.ranking import RANK_RULE
from reports.sequential import metric_title

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
            "rows": [],
        }
        for row in ov[g.gid]:
            r = row["run"]
            tasks: dict[str, dict] = {}
            for c, s in zip(g.columns, row["cells"]):
                if s is not None:
                    tasks.setdefault(c.task, {})[c.key] = _cell_json(s)
            o = row["overall"]
            gd["rows"].append({
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
                         "training": row["cost"]["training"]}})
        h = ho[g.gid]
        gd["holdout"] = {"tasks": h["tasks"], "rule": h["rule"], "note": h["note"], "rows": [
            {"run": row["run"].label, "reference": row["run"].reference, "trained_on": row["trained_on"],
             "holdout_tasks": row["unseen_tasks"], "status": row["status"],
             "tasks": {t: {c.key: _cell_json(s) for c, s in zip(h["columns"], row["cells"])
                           if c.task == t and s is not None} for t in h["tasks"]},
             "heldout_mean": {m: _r(v) for m, v in row["heldout"].items()},
             "other_tasks_mean": {m: _r(v) for m, v in row["other"].items()},
             "gap": {m: _r(v) for m, v in row["gap"].items()}} for row in h["rows"]]}
        c = cmp[g.gid]
        comps = []
        for row in c["rows"]:
            for col, cell in zip(g.columns, row["cells"]):
                if cell is not None:
                    comps.append({"run": row["run"].label, "reference": row["run"].reference, "task": col.task,
                                  "metric": col.key, **_cmp_json(cell),
                                  "editor_mean": _r(cell.get("editor_mean")), "baseline_mean": _r(cell.get("base_mean"))})
            if row["overall"] is not None:
                comps.append({"run": row["run"].label, "reference": row["run"].reference, "task": "all",
                              "metric": g.rank_key, **_cmp_json(row["overall"])})
        gd["baseline_comparison"] = {
            "baseline_run": c["base"].label if c["base"] else None,
            "baseline_run_dir": c["base"].name if c["base"] else None, "note": c["note"],
            "test": "paired bootstrap of the shared cases (2,000 resamples); p from the same resamples; "
                    "Holm-adjusted marks", "n_tests": c["n_tests"], "comparisons": comps}
        p = (pw or {}).get(g.gid)
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
        gd["pairwise"] = {"n_tests": p["n_tests"] if p else 0, "comparisons": pairs}
        gap = (pg or {}).get(g.gid) or {"rows": []}
        gd["protocol_gap"] = [
            {"run": row["run"].label, "task": t, "metric": tf, "wild_metric": wild, "teacher_forced": _r(x["tf"]),
             "wild": _r(x["wild"]), "gap": _r(x["gap"]), "n": x["n"]}
            for row in gap["rows"] for (t, tf, wild), x in zip(gap["columns"], row["cells"]) if x is not None]
        if (sq or {}).get(g.gid):
            gd["sequential"] = checkpoints_json(sq[g.gid])
        doc["groups"].append(gd)
    return doc


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

def _md_escape(s: Any) -> str:
    """`s` as literal Markdown table text (no markup, no line breaks)."""
    return re.sub(r"([\\|<>*_`\[\]])", r"\\\1", str(s)).replace("\n", " ")


def _md_num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _md_stat(s: dict | None, best: bool = False) -> str:
    """'post [lo, hi] n=k (pre p)' of a cell; bold when the best of its column."""
    if s is None or s.get("post") is None:
        return "–"
    v = f"**{s['post']:.1f}**" if best else f"{s['post']:.1f}"
    if s.get("lo") is not None and s.get("hi") is not None:
        v += f" [{s['lo']:.1f}, {s['hi']:.1f}]"
    if s.get("n") is not None:
        v += f" n={s['n']}"
    if s.get("pre") is not None:
        v += f" (pre {s['pre']:.1f})"
    return v


def cross_model_cell(c: dict | None) -> str:
    """'rank (Score [lo, hi])' of one editor on one model; '–' where it did not run."""
    if c is None:
        return "–"
    rank = "–" if c["rank"] is None else f"{c['rank']}{'=' if c['tied'] else ''}"
    if c["value"] is None:
        return rank
    ci = "" if c["lo"] is None else f" [{c['lo']:.1f}, {c['hi']:.1f}]"
    return f"{rank} ({c['value']:.1f}{ci})"


def agreement_text(a: dict) -> str:
    """One line on whether two models rank the editors alike."""
    tau = "–" if a["tau"] is None else f"{a['tau']:+.2f}"
    lead = (f"of those, {', '.join(a['leaders'][0])} rank first on both" if a["same_leaders"] else
            f"of those, rank 1 on {a['a']}: {', '.join(a['leaders'][0]) or '–'}; on {a['b']}: "
            f"{', '.join(a['leaders'][1]) or '–'}")
    return f"{a['a']} vs {a['b']}: Kendall's tau-b {tau} over the {a['n']} editors ranked on both; {lead}."


def _cross_model_markdown(x: dict) -> list[str]:
    rank_label = COMPOSITES[x["rank_key"]][0] if x.get("rank_key") in COMPOSITES else "Score"
    L = ["## Across models", "",
         f"Each editor's rank on each model ({rank_label}, mean over that model's tasks, with its 95% interval); "
         "ranks are each model's own. " + _md_escape(" ".join(agreement_text(a) for a in x["agreement"])), ""]
    head = ["Run"] + [_md_escape(m) for m in x["models"]]
    body = [[_md_escape(r["label"])] + [cross_model_cell(c) for c in r["cells"]] for r in x["rows"]]
    return L + _md_table(head, body) + [""]


def _md_table(head: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or [":---"] + ["---:"] * (len(head) - 1)
    return (["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _held_mark(g: Group, task: str) -> str:
    return "†" if g.heldout_for(task) else ""


def _run_md(r, g: Group | None = None, reference_note: bool = True, trained: bool = False) -> str:
    label = r.label
    if r.reference and reference_note:
        label += " (no edit: reference)"
    if r.sample_data:
        label += f" ({r.data}: not comparable)"
    if not r.complete:
        label += f" — {r.incomplete_mark}, not ranked"
    elif g is not None and g.fewer_mark(r):
        label += f" — {g.fewer_mark(r)}, not ranked"
    if trained and r.train_tasks is not None:
        label += f" (trained on {', '.join(r.train_tasks) or 'nothing'})"
    return _md_escape(label)


def _md_rank(row: dict) -> str:
    r = row["run"]
    if r.reference:
        return "ref"
    if row["rank"] is None:
        return "–"
    return f"{row['rank']}{'=' if row['tied'] else ''} {row['letters']}".strip()


def _md_training(t: dict | None) -> str:
    if t is None or t.get("seconds") is None:
        return "–"
    return f"{t['seconds']:.0f} s" + ("" if t.get("steps") is None else f" ({t['steps']} steps)")


def leaderboard_markdown(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict,
                         cmp: dict, pg: dict | None = None, pw: dict | None = None, vd: dict | None = None,
                         mx: dict | None = None, xm: list | None = None, sq: dict | None = None) -> str:
    """The content of leaderboard.md: the same tables as the HTML page (one per metric family),
    without the charts."""
    L = [f"# {_md_escape(title)}", "",
         "Post-edit means in percent with 95% bootstrap interval, n = cases, pre-edit value in parentheses; "
         "the best value of each column (the no-edit reference left out) in bold. " + _md_escape(RANK_RULE), "",
         "Score = ROME's composite: " + "; ".join(f"{v[0]} = {v[3]}" for v in COMPOSITES.values()) + ".", ""]
    if mx is not None:
        L += _matrix_markdown(mx)
    for x in xm or []:
        L += _cross_model_markdown(x)
    for g in groups:
        L += [f"## {_md_escape(g.heading)}", ""]
        for line in (vd or {}).get(g.gid, []):
            L += [f"**{_md_escape(line)}**", ""]
        held = [t for t in g.tasks if g.heldout_for(t)]
        if held:
            L += [f"† held out of training by {_md_escape(', '.join(sorted({x for t in held for x in g.heldout_for(t)})))} "
                  "(editors that do not train saw no task at all).", ""]
        rows = ov[g.gid]
        rank_label = COMPOSITES[g.rank_key][0] if g.rank_key else "Score"
        for fam in g.families:
            cols = [i for i, c in enumerate(g.columns) if c.family == fam]
            head = (["#", "Run"] + ([f"{rank_label} (mean over tasks)"] if fam == "token" and g.rank_key else [])
                    + [f"{_md_escape(g.columns[i].task)}{_held_mark(g, g.columns[i].task)} {g.columns[i].abbr}" for i in cols]
                    + (["s/edit (median)", "peak memory", "training"] if fam == "token" else []))
            body = []
            for row in rows:
                r = row["run"]
                cells = [_md_rank(row), _run_md(r, g, trained=True)]
                if fam == "token" and g.rank_key:
                    o = row["overall"]
                    cells.append("–" if o is None else _md_stat({"post": o["value"], "lo": o["lo"], "hi": o["hi"]},
                                                               row["best_overall"]))
                cells += [_md_stat(row["cells"][i], row["best"][i]) for i in cols]
                if fam == "token":
                    cells += ["–" if row["cost"]["edit_s"] is None else f"{row['cost']['edit_s']:.3g} s",
                              "–" if row["cost"]["peak_mb"] is None else f"{row['cost']['peak_mb']:.0f} MB",
                              _md_training(row["cost"]["training"])]
                body.append(cells)
            L += [f"**{FAMILIES[fam][0][0].upper() + FAMILIES[fam][0][1:]}**", ""]
            L += _md_table(head, body, ["---:", ":---"] + ["---:"] * (len(head) - 2))
            if fam == "token":
                L += [f"_s/edit: median seconds per edit (edits computed together share their time); "
                      f"{PEAK_MEMORY_NOTE}._", ""]
        h = ho[g.gid]
        if h["tasks"]:
            L += [f"**Held-out tasks** ({_md_escape(', '.join(h['tasks']))}): every run, on the tasks it never trained "
                  "on, against its mean on the group's other tasks. " + _md_escape(h["rule"]), ""]
            hcols = [c for c in h["columns"] if c.family == "token"]
            idx = [i for i, c in enumerate(h["columns"]) if c.family == "token"]
            head = ["Run", "status"] + [f"{_md_escape(c.task)}† {c.abbr}" for c in hcols] + \
                   [f"{METRIC_ABBR[m]} held-out / other tasks (gap)" for m in h["metrics"]]
            body = []
            for row in h["rows"]:
                cells = [_run_md(row["run"], g), _md_escape(row["status"])]
                for i in idx:
                    cells.append("trained on" if row["trained"][i] else _md_stat(row["cells"][i], row["best"][i]))
                for m in h["metrics"]:
                    gp = row["gap"][m]
                    cells.append(f"{_md_num(row['heldout'][m])} / {_md_num(row['other'][m])}"
                                 + ("" if gp is None else f" ({signed(gp)})"))
                body.append(cells)
            L += _md_table(head, body)
        elif h.get("note"):
            L += [f"_{_md_escape(h['note'])}_", ""]
        c = cmp[g.gid]
        if c["base"] is not None and c["rows"]:
            L += [f"**Versus baseline {_md_escape(c['base'].label)}** (run directory {_md_escape(c['base'].name)}; "
                  "difference run − baseline in points). "
                  + _md_escape(MARK_RULE.format(alpha=ALPHA, n=c["n_tests"], min_pairs=MIN_PAIRS))
                  + " The no-edit reference row carries no marks.", ""]
            if c["note"]:
                L += [f"_{_md_escape(c['note'])}_", ""]
            for fam in g.families:
                cols = [i for i, col in enumerate(g.columns) if col.family == fam]
                head = ["Run"] + ([f"{rank_label} (mean over tasks)"] if fam == "token" and g.rank_key else []) + \
                    [f"{_md_escape(g.columns[i].task)}{_held_mark(g, g.columns[i].task)} {g.columns[i].abbr}" for i in cols]
                body = []
                for row in c["rows"]:
                    cells = [_run_md(row["run"], g)]
                    if fam == "token" and g.rank_key:
                        cells.append(comparison_text(row["overall"]))
                    cells += [comparison_text(row["cells"][i]) for i in cols]
                    body.append(cells)
                L += _md_table(head, body)
        elif c["note"]:
            L += [f"_{_md_escape(c['note'])}_", ""]
        p = (pw or {}).get(g.gid)
        if p and p["matrices"]:
            runs = p["runs"]
            L += [f"**Pairwise comparisons** ({rank_label}, row − column, in points). "
                  + _md_escape(MARK_RULE.format(alpha=ALPHA, n=p["n_tests"], min_pairs=MIN_PAIRS)), ""]
            for mat in p["matrices"]:
                L += [f"_{_md_escape(mat['title'])}_", ""]
                body = [[_md_escape(a.label)] + ["" if i == j else comparison_text(mat["cells"][i][j]) for j in range(len(runs))]
                        for i, a in enumerate(runs)]
                L += _md_table(["row − column"] + [_md_escape(b.label) for b in runs], body)
        gap = (pg or {}).get(g.gid)
        if gap and gap["rows"]:
            L += ["**Teacher forced vs. in the wild** (post-edit %, teacher-forced / wild, and the gap "
                  "teacher-forced − wild in points):", ""]
            head = ["Run"] + [f"{_md_escape(t)} {gap['abbr'][tf]}" for t, tf, _ in gap["columns"]]
            body = [[_md_escape(row["run"].label)] + ["–" if x is None else f"{x['tf']:.1f} / {x['wild']:.1f} ({signed(x['gap'])})"
                                                      for x in row["cells"]] for row in gap["rows"]]
            L += _md_table(head, body)
        if (sq or {}).get(g.gid):
            L += _checkpoints_markdown(sq[g.gid])
    return "\n".join(L).rstrip() + "\n"


def _checkpoints_markdown(table: dict) -> list[str]:
    """A sequential group's checkpoint table: per task a row per run and number of edits."""
    L = ["**Sequential editing: checkpoints.** " + _md_escape(table["rule"]), ""]
    if table["trained"]:
        L += ["_Trained on the task shown: " + _md_escape("; ".join(f"{x['run']} ({', '.join(x['tasks'])})"
                                                              for x in table["trained"])) + "._", ""]
    for t in table["tasks"]:
        head = ["Run", "edits"] + [_md_escape(metric_title(m)) for m in t["metrics"]]
        body = []
        for e in t["runs"]:
            label = _md_escape(e["run"].label)
            body.append([label, "before"] + [_md_num(e["pre"].get(m)) for m in t["metrics"]])
            for c in e["checkpoints"]:
                body.append([label, str(c["n_edits"])] + [_md_stat(c["cells"].get(m)) for m in t["metrics"]])
        L += [f"_{_md_escape(t['task'])}_", ""] + _md_table(head, body, [":---"] + ["---:"] * (len(head) - 1))
    for e in table["regression"]:
        ns = [c["n_edits"] for c in e["runs"][0]["checkpoints"]]
        head = ["Run", "before"] + [f"{n} edits" for n in ns]
        body = [[_md_escape(x["run"].label), "–" if x["before"] is None else f"{x['before']:.4g}"]
                + [f"{c['value']:.4g}" for c in x["checkpoints"]] for x in e["runs"]]
        L += [f"_lm-eval {_md_escape(e['task'])}: {_md_escape(e['metric'])}_", ""] + _md_table(head, body)
    return L


def _matrix_markdown(mx: dict) -> list[str]:
    """The leave-one-task-out matrix (reports.matrix): one table per metric, then the training."""
    L = ["## Leave-one-task-out matrix", "", _md_escape(mx["rule"]), ""]
    if mx["missing"]:
        L += [f"_Missing run directories: {_md_escape(', '.join(mx['missing']))}._", ""]
    for title, head, body in metric_tables(mx):
        L += [f"**{_md_escape(title)}**", ""]
        L += _md_table([_md_escape(h) for h in head], [[_md_escape(c) for c in row] for row in body])
    head, body = training_table(mx)
    L += ["**Training** (each run's editor; kept step: the validation with the lowest loss, whose network is "
          "used; Score on its training tasks: mean over them of the per-task Score)", ""]
    L += _md_table(head, [[_md_escape(c) for c in row] for row in body],
                   [":---"] * (len(head) - 3) + ["---:"] * 3)  # with seeds, a seed column
    for line in mx.get("summary") or []:  # the multi-task column's mean difference (reports.seeded)
        L += [f"**{_md_escape(line)}**", ""]
    if mx.get("seed_table"):  # several training seeds: the per-seed values (reports.seeded)
        head, body = mx["seed_table"]
        L += ["**Per seed** (each run's value per training seed; each difference's per-seed values, their "
              "standard deviation, the mean with its hierarchical-bootstrap interval and the verdict)", ""]
        L += _md_table([_md_escape(h) for h in head], [[_md_escape(c) for c in row] for row in body],
                       [":---"] * 4 + ["---:", ":---"])
    return L
