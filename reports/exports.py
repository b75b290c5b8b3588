"""The leaderboard in machine-readable form and as Markdown: leaderboard.json, leaderboard.csv
(the overview table) and leaderboard.md."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from reports.stats import ALPHA
from reports.views import METRIC_ABBR, METRICS, Group

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _r(x: float | None, nd: int = 4) -> float | None:
    """`x` rounded for the exports; NaN becomes None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def leaderboard_json(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict,
                     cmp: dict, pg: dict | None = None) -> dict:
    """The content of leaderboard.json. `ov`, `ho`, `cmp` and `pg` map a group's gid to its
    overview, held-out view, baseline comparison and teacher-forced vs wild gap (reports.views)."""
    doc: dict[str, Any] = {"title": title, "baseline": baseline, "alpha": ALPHA, "groups": []}
    for g in groups:
        gd: dict[str, Any] = {
            "heading": g.heading,
            "model": {"spec": g.model_spec, "source_hash": g.model_hash},
            "metric_definitions": g.metric_definitions,
            "tasks": [{"name": t, "holdout": g.holdout_status(t), "metrics": g.task_metrics[t]}
                      for t in g.tasks],
            "rows": [],
        }
        for row in ov[g.gid]:
            r = row["run"]
            tasks: dict[str, dict] = {}
            for (t, m), s in zip(g.columns, row["cells"]):
                if s is not None:
                    tasks.setdefault(t, {})[m] = {"pre": s["pre"], "post": s["post"],
                                                  "ci": [s["lo"], s["hi"]], "n": s["n"]}
            gd["rows"].append({"rank": row["rank"], "run": r.label, "editor": r.editor, "data": r.data,
                               "run_dir": str(r.path), "created": r.created,
                               "holdout_tasks": [t for t in r.tasks if r.holdout(t)],
                               "tasks": tasks, "mean": {m: _r(v) for m, v in row["means"].items()}})
        h = ho[g.gid]
        gd["holdout"] = {"tasks": h["tasks"], "rows": [
            {"run": row["run"].label, "holdout_tasks": row["holdout_tasks"],
             "heldout_mean": {m: _r(v) for m, v in row["heldout"].items()},
             "indistribution_mean": {m: _r(v) for m, v in row["indist"].items()},
             "gap": {m: _r(v) for m, v in row["gap"].items()}} for row in h["rows"]]}
        c = cmp[g.gid]
        comps = []
        for row in c["rows"]:
            for (t, m), cell in zip(g.columns, row["cells"]):
                if cell is not None:
                    comps.append({"run": row["run"].label, "task": t, "metric": m,
                                  "diff": _r(cell["diff"]), "p": _r(cell["p"], 6),
                                  "ci": [_r(cell["lo"]), _r(cell["hi"])], "n": cell["n"],
                                  "editor_mean": _r(cell["editor_mean"]), "baseline_mean": _r(cell["base_mean"]),
                                  "mark": cell["mark"]})
        gd["baseline_comparison"] = {"baseline_run": c["base"].label if c["base"] else None,
                                     "note": c["note"], "test": "paired sign-flip permutation (two-sided)",
                                     "comparisons": comps}
        gap = (pg or {}).get(g.gid) or {"rows": []}
        gd["protocol_gap"] = [
            {"run": row["run"].label, "task": t, "metric": tf, "wild_metric": wild, "teacher_forced": _r(c["tf"]),
             "wild": _r(c["wild"]), "gap": _r(c["gap"]), "n": c["n"]}
            for row in gap["rows"] for (t, tf, wild), c in zip(gap["columns"], row["cells"]) if c is not None]
        doc["groups"].append(gd)
    return doc


def leaderboard_frame(groups: list[Group], ov: dict) -> pd.DataFrame:
    """The overview of every group as one table (the rows of leaderboard.csv)."""
    records, cols = [], ["group", "rank", "run", "editor", "data", "model", "source_hash",
                         "metric_definitions", "run_dir"]
    for g in groups:
        for t, m in g.columns:
            for c in (f"{t}/{m}", f"{t}/{m}/ci_lo", f"{t}/{m}/ci_hi", f"{t}/{m}/n"):
                if c not in cols:
                    cols.append(c)
    mean_cols = [f"mean/{m}" for m in METRICS] + ["mean/all"]
    for g in groups:
        for row in ov[g.gid]:
            r = row["run"]
            rec: dict[str, Any] = {"group": g.heading, "rank": row["rank"], "run": r.label, "editor": r.editor,
                                   "data": r.data, "model": g.model_spec, "source_hash": g.model_hash,
                                   "metric_definitions": g.metric_definitions, "run_dir": str(r.path)}
            for (t, m), s in zip(g.columns, row["cells"]):
                if s is not None:
                    rec[f"{t}/{m}"], rec[f"{t}/{m}/ci_lo"], rec[f"{t}/{m}/ci_hi"], rec[f"{t}/{m}/n"] = \
                        s["post"], s["lo"], s["hi"], s["n"]
            for m, v in row["means"].items():
                rec[f"mean/{m}"] = _r(v)
            records.append(rec)
    present = [c for c in mean_cols if any(c in rec for rec in records)]
    df = pd.DataFrame.from_records(records, columns=cols + present)
    return df.astype({c: "Int64" for c in df.columns if c.endswith("/n") or c == "rank"})


def neutralise_csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with a quote; anything
    else (numbers, negative ones included, and missing values) unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_leaderboard_csv(path: Path, groups: list[Group], ov: dict) -> None:
    """leaderboard.csv, with every text cell (the header included) neutralised: run labels,
    directory names, model and task names come from the runs and may start with '='."""
    df = leaderboard_frame(groups, ov)
    for column in df.columns:
        if not pd.api.types.is_numeric_dtype(df[column]):  # text: object or pandas' str dtype
            df[column] = df[column].map(neutralise_csv_cell)
    df.columns = [neutralise_csv_cell(c) for c in df.columns]
    df.to_csv(path, index=False)


def _md_escape(s: Any) -> str:
    """`s` as literal Markdown table text (no markup, no line breaks)."""
    return re.sub(r"([\\|<>*_`\[\]])", r"\\\1", str(s)).replace("\n", " ")


def _md_num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def leaderboard_markdown(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict,
                         cmp: dict, pg: dict | None = None) -> str:
    """The content of leaderboard.md: the same tables as the HTML page, without the charts."""
    L = [f"# {_md_escape(title)}", "",
         "Post-edit means in percent with 95% bootstrap CI; ranked by the mean over metrics of the "
         "per-metric mean across tasks.", ""]
    for g in groups:
        L += [f"## {_md_escape(g.heading)}", ""]
        head = ["#", "Run"] + [f"{_md_escape(t)} {METRIC_ABBR[m]}" + (" (held out)" if g.holdout_status(t) == "all" else "")
                               for t, m in g.columns] + ["Mean"]
        L += ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", ":---"] + ["---:"] * (len(head) - 2)) + "|"]
        for row in ov[g.gid]:
            cells = []
            for s in row["cells"]:
                if s is None or s["post"] is None:
                    cells.append("–")
                elif s["lo"] is not None and s["hi"] is not None:
                    cells.append(f"{s['post']:.1f} [{s['lo']:.1f}, {s['hi']:.1f}]")
                else:
                    cells.append(f"{s['post']:.1f}")
            label = row["run"].label + (f" ({row['run'].data}: not comparable)" if row["run"].sample_data else "")
            L.append("| " + " | ".join([str(row["rank"] or "–"), _md_escape(label)] + cells
                                       + [_md_num(row["means"]["all"])]) + " |")
        L.append("")
        h = ho[g.gid]
        if h["tasks"]:
            L += [f"**Held-out tasks** ({_md_escape(', '.join(h['tasks']))}) vs. in-distribution mean:", ""]
            head = ["Run"] + [f"{METRIC_ABBR[m]} held-out / in-dist" for m in h["metrics"]]
            L += ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
            for row in h["rows"]:
                L.append("| " + " | ".join([_md_escape(row["run"].label)] + [
                    f"{_md_num(row['heldout'][m])} / {_md_num(row['indist'][m])}" for m in h["metrics"]]) + " |")
            L.append("")
        c = cmp[g.gid]
        if c["base"] is not None and c["rows"]:
            L += [f"**Versus baseline {_md_escape(c['base'].label)}** (difference in points; paired sign-flip "
                  f"test over shared cases: ▲ better / ▼ worse at p < {ALPHA}, · not significant):", ""]
            head = ["Run"] + [f"{_md_escape(t)} {METRIC_ABBR[m]}" for t, m in g.columns]
            L += ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
            for row in c["rows"]:
                cells = ["–" if x is None else f"{x['diff']:+.1f} {x['mark']} (p={x['p']:.3g})" for x in row["cells"]]
                L.append("| " + " | ".join([_md_escape(row["run"].label)] + cells) + " |")
            L.append("")
        elif c["note"]:
            L += [f"_{_md_escape(c['note'])}_", ""]
        gap = (pg or {}).get(g.gid)
        if gap and gap["rows"]:
            L += ["**Teacher forced vs. in the wild** (post-edit %, teacher-forced / wild, and the gap "
                  "teacher-forced − wild in points):", ""]
            head = ["Run"] + [f"{_md_escape(t)} {gap['abbr'][tf]}" for t, tf, _ in gap["columns"]]
            L += ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
            for row in gap["rows"]:
                cells = ["–" if x is None else f"{x['tf']:.1f} / {x['wild']:.1f} ({x['gap']:+.1f})" for x in row["cells"]]
                L.append("| " + " | ".join([_md_escape(row["run"].label)] + cells) + " |")
            L.append("")
    return "\n".join(L).rstrip() + "\n"
