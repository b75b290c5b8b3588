"""Leaderboard reporter: turns `bench run` directories (docs/run-format.md) into

* ``index.html``   a self-contained page (inline CSS, inline SVG, a little inline JS, no network):
                   verdicts, overview ranked by the composite Score, held-out view, baseline and
                   pairwise comparisons, charts, per-run provenance;
* ``cases-<run>-<task>.html``  per run and task drill-down pages listing every case;
* ``leaderboard.json`` / ``leaderboard.csv``  the overview table in machine-readable form;
* ``leaderboard.md``  a Markdown summary (``fmt="md"`` or ``"all"``).

This module is the entry point (`build_report`) and the HTML rendering; the data come from
reports.runs (loading), reports.views (tables), reports.stats, reports.svg, reports.exports and reports.markdown.
docs/report.md describes what the page shows and the rules behind it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from bench.core.errors import BenchError
from bench.core.io import write_json_atomic
from reports.exports import checkpoints_frame, leaderboard_json, write_leaderboard_csv
from reports.markdown import agreement_text, cross_model_cell, leaderboard_markdown
from reports.matrix import matrix_view, metric_grid, read_matrix, run_dirs as matrix_run_dirs, training_table
from reports.runs import Run, SummaryRebuild, assign_labels, load_run, scrub_paths, slugify
from reports.stats import ALPHA, MIN_PAIRS, format_p, p_text, signed
from reports.svg import look_sample, svg_bars, svg_curves, svg_scatter, svg_scores
from reports.cases import FAILURE_RULE, case_rows
from reports.compare import DEFAULT_BASELINE, Pairing, comparison, pairwise, resolve_baseline
from reports.crossmodel import cross_model
from reports.groups import COMPOSITES, FAMILIES, METRIC_ABBR, make_groups, segments
from reports.heldout import holdout_view, protocol_gap
from reports.ranking import RANK_RULE, overview
from reports.sequential import checkpoint_table, metric_title, sequential_curves
from reports.verdicts import verdicts

FORMATS = ("html", "md", "all")
DEFAULT_TITLE = "instructedit-bench leaderboard"
TEMPLATES = Path(__file__).parent / "templates"
# Special tokens a tokenizer decodes literally: <|im_end|>, </s>, <eos>, [SEP], ...
SPECIAL_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|<(?:eos|bos|pad|unk|mask)>|\[(?:CLS|SEP|PAD|UNK|MASK)\]")
_WS_SIGNS = {"\n": ("⏎", "newline"), "\r": ("␍", "carriage return"), "\t": ("⇥", "tab")}


def _visible(text: str, lead: bool, trail: bool) -> str:
    """`text` escaped, with newlines, tabs, leading/trailing and repeated spaces and other
    invisible characters shown as signs, and U+FFFD marked."""
    out = []
    n = len(text)
    for i, ch in enumerate(text):
        if ch in _WS_SIGNS:
            sign, name = _WS_SIGNS[ch]
            out.append(f'<span class="ws" title="{name}">{sign}</span>')
        elif ch == "\ufffd":
            out.append('<span class="repl" title="U+FFFD: part of a character split across tokens">\ufffd</span>')
        elif ch == " ":
            edge = (lead and text[:i].strip(" ") == "") or (trail and text[i:].strip(" ") == "")
            run = (i > 0 and text[i - 1] == " ") or (i + 1 < n and text[i + 1] == " ")
            out.append('<span class="ws" title="space">·</span>' if edge or run else " ")
        elif ch.isspace() or ch in "\u200b\u200c\u200d\u2060\ufeff":
            out.append(f'<span class="ws" title="U+{ord(ch):04X}">·</span>')
        else:
            out.append(str(escape(ch)))
    return "".join(out)


def show_text(x: object) -> Markup:
    """A model's token text as the drill-down shows it: whitespace visible, special tokens and
    replacement characters marked, an empty text as '(empty)', a missing one as '–'."""
    if x is None:
        return Markup('<span class="muted">–</span>')
    s = str(x)
    if s == "":
        return Markup('<span class="empty">(empty)</span>')
    parts, pos = [], 0
    for m in SPECIAL_TOKEN.finditer(s):
        parts.append(_visible(s[pos:m.start()], pos == 0, False))
        parts.append(f'<span class="special" title="special token">{escape(m.group())}</span>')
        pos = m.end()
    parts.append(_visible(s[pos:], pos == 0, True))
    return Markup("".join(parts))


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x, nd=1: "–" if x is None else f"{x:.{nd}f}"
    env.filters["signed"] = signed
    env.filters["pval"] = format_p
    env.filters["ptext"] = p_text
    env.filters["score"] = lambda x: "–" if x is None else f"{x:.3g}"
    env.filters["tojson_compact"] = lambda x: json.dumps(x, sort_keys=True, ensure_ascii=False)
    env.filters["dv"] = lambda x: "" if x is None else repr(float(x))
    env.filters["tok"] = show_text
    env.globals.update(look_sample=look_sample, metric_title=metric_title, METRIC_ABBR=METRIC_ABBR, ALPHA=ALPHA, MIN_PAIRS=MIN_PAIRS, FAMILIES=FAMILIES,
                       COMPOSITES=COMPOSITES, RANK_RULE=RANK_RULE, segments=segments, FAILURE_RULE=FAILURE_RULE, zip=zip,
                       enumerate=enumerate)
    return env


def environment() -> Environment:
    """The Jinja environment of every page (reports.index renders the leaderboards' index)."""
    return _env()


def _task_file(run: Run, task: str) -> str:
    """File name of the drill-down page of `run` on `task`."""
    return f"cases-{run.slug}-{slugify(task)}.html"


def _run_details(r: Run) -> dict:
    """The per-run section of index.html: the command as recorded and its extensions, model,
    editor settings (those set for the run apart), versions, tasks; absolute paths shortened."""
    c = r.config
    ed = c.get("editor") if isinstance(c.get("editor"), dict) else {}
    info = r.summary.get("task_info") if isinstance(r.summary.get("task_info"), dict) else {}
    tasks = []
    names = [t.get("name") for t in r.config_tasks]
    for t in r.config_tasks + [{"name": n} for n in r.tasks if n not in names]:
        ti = info.get(t.get("name")) if isinstance(info.get(t.get("name")), dict) else {}
        df = t.get("data_files") if isinstance(t.get("data_files"), dict) else {}
        name = str(t.get("name"))
        tasks.append({"name": name, "split": t.get("split"), "holdout": r.holdout(name), "unseen": r.unseen(name),
                      "metrics": ", ".join(map(str, t.get("metrics") or [])),
                      "n_cases": ti.get("n_cases", t.get("n_cases")), "skipped": t.get("skipped", ti.get("skipped")),
                      "errors": ti.get("errors"), "median_edit_s": r.median_edit_s(name),
                      "data_files": sorted((str(scrub_paths(k)), str(v)) for k, v in df.items()),
                      "page": _task_file(r, name) if name in r.tasks or any(
                          str(x.get("task")) == name for x in r.cases) else None})
    ext = [{"limit": e.get("limit"), "at": e.get("at"),
            "command": f"bench run --resume {r.name}" + (f" --limit {e['limit']}" if e.get("limit") is not None else "")}
           for e in r.extended]
    return {"command": scrub_paths(c.get("command")), "extended": ext, "created": c.get("created"),
            "model": r.model, "editor": ed.get("name", r.editor), "hparams": scrub_paths(ed.get("hparams", {})),
            "overrides": scrub_paths(r.hparam_overrides), "mode": r.mode, "prompt_format": r.prompt_format,
            "protocols": c.get("protocols"),
            "uses_instructions": ed.get("uses_instructions"), "instruction_mode": c.get("instruction_mode"),
            "seed": c.get("seed"), "limit": c.get("limit"), "metric_definitions": c.get("metric_definitions"),
            "versions": c.get("versions") if isinstance(c.get("versions"), dict) else {},
            "train_tasks": r.train_tasks, "median_edit_s": r.median_edit_s(), "peak_mb": r.peak_memory_mb(),
            "notes": scrub_paths(r.notes), "wall_time_s": r.summary.get("wall_time_s"), "tasks": tasks}


def _load_runs(run_dirs: list[Path], rebuild_summary: SummaryRebuild | None) -> list[Run]:
    """Each run directory loaded once (a directory named twice is one run), labelled."""
    seen, runs = set(), []
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            continue
        seen.add(key)
        runs.append(load_run(Path(d), rebuild_summary))
    assign_labels(runs)
    return runs


def _write_html(out_dir: Path, title: str, baseline: str, runs: list[Run], groups: list, files: list[str],
                case_text: bool, views: dict) -> Path:
    """index.html and a drill-down page per run and task; returns index.html's path."""
    ov, sq, mx, xm = views["ov"], views["sq"], views["mx"], views["xm"]
    env = _env()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = env.get_template("index.html.j2").render(
        title=title, generated=generated, baseline=baseline, runs=runs, files=files,
        groups=[{"g": g, "overview": ov[g.gid], "holdout": views["ho"][g.gid], "cmp": views["cmp"][g.gid],
                 "gap": views["pg"][g.gid], "pairwise": views["pw"][g.gid], "verdicts": views["vd"][g.gid],
                 "scores": svg_scores(g, ov[g.gid]), "bars": svg_bars(g), "scatter": svg_scatter(g),
                 "checkpoints": sq.get(g.gid),
                 "curves": svg_curves(g, sequential_curves(g, sq[g.gid])) if g.gid in sq else None}
                for g in groups],
        details={r.slug: _run_details(r) for r in runs}, task_file=_task_file,
        matrix=mx, matrix_grid=metric_grid(mx) if mx else [], cross_model=xm,
        cross_model_cell=cross_model_cell, agreement_text=agreement_text,
        matrix_training=training_table(mx) if mx else None)
    main = out_dir / "index.html"
    main.write_text(page, encoding="utf-8")
    tpl = env.get_template("cases.html.j2")
    for r in runs:
        for t in dict.fromkeys(r.tasks + [str(c.get("task")) for c in r.cases]):
            rows = case_rows(r, t, case_text)
            (out_dir / _task_file(r, t)).write_text(tpl.render(
                title=title, run=r, task=t, rows=rows, n_failed=sum(x["failed"] for x in rows),
                n_kind={k: sum(k in x["kinds"] for x in rows) for k in ("edit", "broke", "error")},
                case_text=case_text, has_cases_file=r.has_cases_file, holdout=r.unseen(t),
                learned=r.train_tasks is not None, generated=generated), encoding="utf-8")
    return main


def build_report(run_dirs: list[Path], out_dir: Path, baseline: str | None = None, fmt: str = "html",
                 title: str | None = None, case_text: bool = True, matrix: Path | None = None,
                 rebuild_summary: SummaryRebuild | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """Write the leaderboard for `run_dirs` into `out_dir` and return the main file's path.

    fmt "html": index.html (+ per run/task case pages), leaderboard.json, leaderboard.csv;
    fmt "md":   leaderboard.md, leaderboard.json, leaderboard.csv;
    fmt "all":  everything. `baseline` names the run the others are compared with: a run
    directory name, a run label or an editor name (an editor with several runs in one group is a
    BenchError listing them, a name that matches no run one listing the labels); "none": no
    comparison; None: the default, an FT run (several in a group: one is chosen, and `log` and
    the comparison's note say which and how to choose another; none: a note).
    case_text=False: drill-down pages without the data records' texts (see
    reports.views.case_rows). `matrix`: a matrix.json of `bench holdout-matrix`; its runs join
    `run_dirs` and the page opens with the matrix (reports.matrix). `rebuild_summary` makes the
    summary of a run stopped before it wrote summary.json (reports.runs.load_run). Raises
    BenchError for unusable input (missing/malformed run files, no runs). The run directories
    are only read, never modified."""
    if fmt not in FORMATS:
        raise BenchError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")
    matrix_doc = read_matrix(Path(matrix)) if matrix is not None else None
    if matrix_doc is not None:
        run_dirs = list(run_dirs) + matrix_run_dirs(matrix_doc, Path(matrix).parent)
    if not run_dirs:
        raise BenchError("no run directories given")
    title = title or DEFAULT_TITLE
    runs = _load_runs(run_dirs, rebuild_summary)
    groups = make_groups(runs)
    pick = baseline is None
    baseline = DEFAULT_BASELINE if baseline is None else baseline
    bases, choices = resolve_baseline(groups, baseline, pick=pick)
    for line in choices.values():
        (log or (lambda _: None))(line)
    pairings = {g.gid: Pairing(g) for g in groups}
    pw = {g.gid: pairwise(g, pairings[g.gid]) for g in groups}  # the ranks come from its tests
    ov = {g.gid: overview(g, pw[g.gid]) for g in groups}
    ho = {g.gid: holdout_view(g) for g in groups}
    cmp = {g.gid: comparison(g, bases[g.gid], baseline, pairings[g.gid], choices.get(g.gid, "")) for g in groups}
    pg = {g.gid: protocol_gap(g) for g in groups}
    vd = {g.gid: verdicts(g, ov[g.gid], ho[g.gid], cmp[g.gid], pw[g.gid], pairings[g.gid]) for g in groups}
    sq = {g.gid: checkpoint_table(g) for g in groups if g.mode == "sequential"}
    mx = matrix_view(matrix_doc, Path(matrix).parent, runs) if matrix_doc is not None else None
    xm = cross_model(groups, ov)

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create {out_dir}: {e.strerror}") from None

    views = {"ov": ov, "ho": ho, "cmp": cmp, "pg": pg, "pw": pw, "vd": vd, "mx": mx, "xm": xm, "sq": sq}
    write_json_atomic(out_dir / "leaderboard.json", leaderboard_json(title, baseline, groups, **views))
    write_leaderboard_csv(out_dir / "leaderboard.csv", groups, ov)
    files = ["leaderboard.json", "leaderboard.csv"]
    if sq:  # the checkpoints of the sequential groups, one row per run, task, edits and metric
        write_leaderboard_csv(out_dir / "checkpoints.csv", groups, ov, df=checkpoints_frame(groups, sq))
        files.append("checkpoints.csv")

    main: Path | None = None
    if fmt in ("md", "all"):
        main = out_dir / "leaderboard.md"
        main.write_text(leaderboard_markdown(title, baseline, groups, **views), encoding="utf-8")
        files.append("leaderboard.md")
    if fmt in ("html", "all"):
        main = _write_html(out_dir, title, baseline, runs, groups, files, case_text, views)
    assert main is not None
    return main
