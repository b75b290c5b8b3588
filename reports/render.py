"""Leaderboard reporter: turns `bench run` directories (docs/run-format.md) into

* ``index.html``   a self-contained page (inline CSS, inline SVG, a little inline JS, no network):
                   overview tables, held-out view, baseline comparison, charts, per-run details;
* ``cases-<run>-<task>.html``  per run and task drill-down pages listing every case;
* ``leaderboard.json`` / ``leaderboard.csv``  the overview table in machine-readable form;
* ``leaderboard.md``  a Markdown summary (``fmt="md"`` or ``"all"``).

This module is the entry point (`build_report`) and the HTML rendering; the data come from
reports.runs (loading), reports.views (tables), reports.stats, reports.svg and reports.exports.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bench.core.errors import BenchError
from bench.core.io import write_json_atomic
from reports.exports import leaderboard_json, leaderboard_markdown, write_leaderboard_csv
from reports.runs import Run, assign_labels, load_run, slugify
from reports.stats import ALPHA
from reports.svg import svg_bars, svg_scatter
from reports.views import (METRIC_ABBR, case_rows, comparison, holdout_view, make_groups, overview,
                           protocol_gap)

FORMATS = ("html", "md", "all")
DEFAULT_TITLE = "instructedit-bench leaderboard"
TEMPLATES = Path(__file__).parent / "templates"


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x, nd=1: "–" if x is None else f"{x:.{nd}f}"
    env.filters["signed"] = lambda x: "–" if x is None else f"{x:+.1f}"
    env.filters["pval"] = lambda p: "–" if p is None or math.isnan(p) else (
        "<0.001" if p < 0.001 else f"{p:.3f}")
    env.filters["score"] = lambda x: "–" if x is None else f"{x:.3g}"
    env.filters["tojson_compact"] = lambda x: json.dumps(x, sort_keys=True, ensure_ascii=False)
    env.filters["dv"] = lambda x: "" if x is None else repr(float(x))
    env.globals.update(METRIC_ABBR=METRIC_ABBR, ALPHA=ALPHA, zip=zip)
    return env


def _task_file(run: Run, task: str) -> str:
    """File name of the drill-down page of `run` on `task`."""
    return f"cases-{run.slug}-{slugify(task)}.html"


def _run_details(r: Run) -> dict:
    """The per-run section of index.html: command, model, editor settings, versions, tasks."""
    c = r.config
    ed = c.get("editor") if isinstance(c.get("editor"), dict) else {}
    info = r.summary.get("task_info") if isinstance(r.summary.get("task_info"), dict) else {}
    tasks = []
    names = [t.get("name") for t in r.config_tasks]
    for t in r.config_tasks + [{"name": n} for n in r.tasks if n not in names]:
        ti = info.get(t.get("name")) if isinstance(info.get(t.get("name")), dict) else {}
        df = t.get("data_files") if isinstance(t.get("data_files"), dict) else {}
        tasks.append({"name": t.get("name"), "split": t.get("split"), "holdout": r.holdout(str(t.get("name"))),
                      "metrics": ", ".join(map(str, t.get("metrics") or [])),
                      "n_cases": t.get("n_cases", ti.get("n_cases")), "skipped": t.get("skipped", ti.get("skipped")),
                      "errors": ti.get("errors"), "data_files": sorted((str(k), str(v)) for k, v in df.items()),
                      "page": _task_file(r, str(t.get("name"))) if t.get("name") in r.tasks or any(
                          str(x.get("task")) == t.get("name") for x in r.cases) else None})
    return {"command": c.get("command"), "created": c.get("created"), "model": r.model,
            "editor": ed.get("name", r.editor), "hparams": ed.get("hparams", {}),
            "uses_instructions": ed.get("uses_instructions"), "instruction_mode": c.get("instruction_mode"),
            "seed": c.get("seed"), "limit": c.get("limit"), "metric_definitions": c.get("metric_definitions"),
            "versions": c.get("versions") if isinstance(c.get("versions"), dict) else {},
            "notes": c.get("notes") or {}, "wall_time_s": r.summary.get("wall_time_s"), "tasks": tasks}


def build_report(run_dirs: list[Path], out_dir: Path, baseline: str | None = "ft", fmt: str = "html",
                 title: str | None = None, case_text: bool = True) -> Path:
    """Write the leaderboard for `run_dirs` into `out_dir` and return the main file's path.

    fmt "html": index.html (+ per run/task case pages), leaderboard.json, leaderboard.csv;
    fmt "md":   leaderboard.md, leaderboard.json, leaderboard.csv;
    fmt "all":  everything. `baseline` names the editor the other runs are compared with (None: no
    comparison). case_text=False: drill-down pages without the data records' texts (see
    reports.views.case_rows). Raises BenchError for unusable input (missing/malformed run files,
    no runs). The run directories are only read, never modified."""
    if fmt not in FORMATS:
        raise BenchError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not run_dirs:
        raise BenchError("no run directories given")
    title = title or DEFAULT_TITLE
    seen, runs = set(), []
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            continue
        seen.add(key)
        runs.append(load_run(Path(d)))
    assign_labels(runs)
    groups = make_groups(runs)
    ov = {g.gid: overview(g) for g in groups}
    ho = {g.gid: holdout_view(g) for g in groups}
    cmp = {g.gid: comparison(g, baseline) for g in groups}
    pg = {g.gid: protocol_gap(g) for g in groups}

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create {out_dir}: {e.strerror}") from None

    write_json_atomic(out_dir / "leaderboard.json", leaderboard_json(title, baseline, groups, ov, ho, cmp, pg))
    write_leaderboard_csv(out_dir / "leaderboard.csv", groups, ov)

    main: Path | None = None
    if fmt in ("md", "all"):
        main = out_dir / "leaderboard.md"
        main.write_text(leaderboard_markdown(title, baseline, groups, ov, ho, cmp, pg), encoding="utf-8")
    if fmt in ("html", "all"):
        env = _env()
        generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        page = env.get_template("index.html.j2").render(
            title=title, generated=generated, baseline=baseline, runs=runs,
            groups=[{"g": g, "overview": ov[g.gid], "holdout": ho[g.gid], "cmp": cmp[g.gid], "gap": pg[g.gid],
                     "bars": svg_bars(g), "scatter": svg_scatter(g)} for g in groups],
            details={r.slug: _run_details(r) for r in runs}, task_file=_task_file)
        main = out_dir / "index.html"
        main.write_text(page, encoding="utf-8")
        tpl = env.get_template("cases.html.j2")
        for r in runs:
            tasks = list(dict.fromkeys(r.tasks + [str(c.get("task")) for c in r.cases]))
            for t in tasks:
                rows = case_rows(r, t, case_text)
                (out_dir / _task_file(r, t)).write_text(tpl.render(
                    title=title, run=r, task=t, rows=rows, n_failed=sum(x["failed"] for x in rows),
                    case_text=case_text,
                    has_cases_file=r.has_cases_file, holdout=r.holdout(t), generated=generated), encoding="utf-8")
    assert main is not None
    return main
