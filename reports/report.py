"""Leaderboard reporter: turns `bench run` directories (docs/run-format.md) into

* ``index.html``   a self-contained page (inline CSS, inline SVG, a little inline JS, no network):
                   overview tables, held-out view, baseline comparison, charts, per-run details;
* ``cases-<run>-<task>.html``  per run and task drill-down pages listing every case;
* ``leaderboard.json`` / ``leaderboard.csv``  the overview table in machine-readable form;
* ``leaderboard.md``  a Markdown summary (``fmt="md"`` or ``"all"``).

Runs of different models (``config.model.spec`` + ``source_hash``) or different metric definitions
(``config.metric_definitions``) are never ranked together: each combination gets its own group.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from bench.core.errors import BenchError

METRICS = ("reliability", "generality", "locality", "portability")
METRIC_ABBR = {"reliability": "Rel", "generality": "Gen", "locality": "Loc", "portability": "Port"}
ALPHA = 0.05
N_PERMUTATIONS = 10_000  # Monte-Carlo sign flips when exact enumeration is too big
EXACT_MAX_N = 16  # up to 2**16 sign patterns are enumerated exactly
N_BOOTSTRAP = 2_000
FORMATS = ("html", "md", "all")
DEFAULT_TITLE = "instructedit-bench leaderboard"
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
TEMPLATES = Path(__file__).parent / "templates"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchError(f"{path.parent}: no {path.name} (not a finished run directory?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _read_cases(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read {path}: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{i}: malformed JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "task" not in rec or "case_id" not in rec:
            raise BenchError(f"{path}:{i}: a case record needs 'task' and 'case_id'")
        out.append(rec)
    return out


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    cases: list[dict]
    has_cases_file: bool
    label: str = ""
    slug: str = ""
    color: str = PALETTE[0]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def editor(self) -> str:
        ed = self.config.get("editor")
        if isinstance(ed, dict) and ed.get("name"):
            return str(ed["name"])
        sc = self.summary.get("config")
        if isinstance(sc, dict) and sc.get("editor"):
            return str(sc["editor"])
        return "?"

    @property
    def model(self) -> dict:
        m = self.config.get("model")
        return m if isinstance(m, dict) else {}

    @property
    def model_spec(self) -> str:
        return str(self.model.get("spec") or "unknown model")

    @property
    def model_hash(self) -> str:
        return str(self.model.get("source_hash") or "")

    @property
    def metric_definitions(self) -> str:
        return str(self.config.get("metric_definitions") or "unspecified")

    @property
    def created(self) -> str:
        return str(self.config.get("created") or "")

    @property
    def config_tasks(self) -> list[dict]:
        t = self.config.get("tasks")
        return [x for x in t if isinstance(x, dict)] if isinstance(t, list) else []

    @property
    def tasks(self) -> list[str]:
        """Tasks with results in summary.json, in config order."""
        have = list(self.summary["tasks"])
        order = [t.get("name") for t in self.config_tasks]
        return [t for t in order if t in have] + [t for t in have if t not in order]

    def holdout(self, task: str) -> bool:
        for t in self.config_tasks:
            if t.get("name") == task and t.get("holdout"):
                return True
        info = (self.summary.get("task_info") or {}).get(task)
        return bool(isinstance(info, dict) and info.get("holdout"))

    def stat(self, task: str, metric: str) -> dict | None:
        """{'pre','post','lo','hi','n'} from summary.json (percent), or None."""
        s = self.summary["tasks"].get(task, {}).get(metric)
        if not isinstance(s, dict):
            return None
        ci = s.get("ci") if isinstance(s.get("ci"), (list, tuple)) and len(s.get("ci")) == 2 else (None, None)
        return {"pre": _num(s.get("pre")), "post": _num(s.get("post")), "lo": _num(ci[0]),
                "hi": _num(ci[1]), "n": s.get("n") if isinstance(s.get("n"), int) else None}

    def case_posts(self) -> dict[tuple[str, str], dict]:
        """(task, case_id) -> post scores, for cases that finished without error."""
        out = {}
        for rec in self.cases:
            if rec.get("error") or not isinstance(rec.get("post"), dict):
                continue
            out[(str(rec["task"]), str(rec["case_id"]))] = rec["post"]
        return out


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"{path}: run directory not found")
    config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    if not isinstance(config, dict):
        raise BenchError(f"{path / 'config.json'}: expected a JSON object")
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise BenchError(f"{path / 'summary.json'}: expected a JSON object with a 'tasks' object")
    for task, metrics in summary["tasks"].items():
        if not isinstance(metrics, dict):
            raise BenchError(f"{path / 'summary.json'}: tasks.{task} is not an object")
    cases_path = path / "cases.jsonl"
    return Run(path, config, summary, _read_cases(cases_path), cases_path.is_file())


def _slugify(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.") or "x"


def _assign_labels(runs: list[Run]) -> None:
    """Label = editor name; when an editor has several runs, add the run directory's name
    (without a leading '<editor>-') so the rows can be told apart."""
    by_editor: dict[str, list[Run]] = {}
    for r in runs:
        by_editor.setdefault(r.editor, []).append(r)
    for editor, rs in by_editor.items():
        if len(rs) == 1:
            rs[0].label = editor
            continue
        for r in rs:
            suffix = r.name[len(editor) + 1:] if r.name.startswith(editor + "-") else r.name
            r.label = f"{editor} ({suffix or r.name})"
    seen: dict[str, int] = {}
    for r in runs:  # identical directory names under different parents
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label} #{seen[r.label]}"
        else:
            seen[r.label] = 1
    slugs: set[str] = set()
    for i, r in enumerate(runs):
        base = _slugify(r.label)
        slug, k = base, 2
        while slug.lower() in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug.lower())
        r.slug = slug
        r.color = PALETTE[i % len(PALETTE)]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def signflip_pvalue(d: np.ndarray, n_resamples: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation test of mean(d) == 0.

    Zero differences do not change |sum(s * d)| under any sign pattern, so they are dropped first.
    Exact (all 2**n sign patterns of the non-zero differences) for n <= 16, else Monte Carlo with
    the +1 correction."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan")
    d = d[np.abs(d) > 1e-12]
    n = len(d)
    obs = abs(d.sum())
    if n == 0 or obs <= 1e-12:
        return 1.0
    thresh = obs * (1 - 1e-9)
    if n <= EXACT_MAX_N:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
        return float(np.mean(np.abs(signs @ d) >= thresh))
    rng = np.random.default_rng(seed)
    total, count, done = d.sum(), 0, 0
    chunk = max(1, min(n_resamples, 8_000_000 // n))
    while done < n_resamples:
        k = min(chunk, n_resamples - done)
        # bit b = 1 keeps the sign, 0 flips it: sum(s * d) = 2 * (bits @ d) - sum(d)
        bits = np.unpackbits(rng.integers(0, 256, size=(k, (n + 7) // 8), dtype=np.uint8), axis=1)[:, :n]
        stat = np.abs(2.0 * (bits.astype(np.float32) @ d.astype(np.float32)) - total)
        count += int(np.count_nonzero(stat >= thresh - 1e-4 * max(1.0, obs)))
        done += k
    return (count + 1) / (n_resamples + 1)


def bootstrap_ci(d: np.ndarray, n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(d)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    done = 0
    while done < n_resamples:
        k = min(chunk, n_resamples - done)
        means.append(d[rng.integers(0, n, size=(k, n))].mean(axis=1))
        done += k
    m = np.concatenate(means)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------------------------
# Groups and the tables built from them
# --------------------------------------------------------------------------------------------

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


def _make_groups(runs: list[Run]) -> list[Group]:
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


def _overview(g: Group) -> list[dict]:
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


def _holdout_view(g: Group) -> dict:
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


def _mark(diff: float | None, p: float | None) -> str:
    if diff is None or p is None or math.isnan(p) or p >= ALPHA or diff == 0:
        return "·"
    return "▲" if diff > 0 else "▼"


def _comparison(g: Group, baseline: str | None) -> dict:
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
                          if k[0] == t and _num(posts[k].get(m)) is not None
                          and _num(bposts[k].get(m)) is not None)
            if not keys:
                cells.append(None)
                continue
            a = np.array([float(posts[k][m]) for k in keys])
            b = np.array([float(bposts[k][m]) for k in keys])
            d = a - b
            p = signflip_pvalue(d)
            lo, hi = bootstrap_ci(d)
            diff = float(d.mean()) * 100
            cells.append({"diff": diff, "p": p, "lo": lo * 100, "hi": hi * 100, "n": len(keys),
                          "editor_mean": float(a.mean()) * 100, "base_mean": float(b.mean()) * 100,
                          "mark": _mark(diff, p)})
        out["rows"].append({"run": r, "cells": cells})
    return out


# --------------------------------------------------------------------------------------------
# Inline SVG charts (every data string passes through markupsafe.escape)
# --------------------------------------------------------------------------------------------

def _f(x: float) -> str:
    return f"{x:.1f}"


def _text_w(s: str, px: float = 6.6) -> float:
    return len(s) * px


def _legend(runs: list[Run], x0: float, y0: float, width: float) -> tuple[list[str], float]:
    parts, x, y = [], x0, y0
    for r in runs:
        w = 16 + _text_w(r.label) + 18
        if x + w > x0 + width and x > x0:
            x, y = x0, y + 18
        parts.append(f'<rect x="{_f(x)}" y="{_f(y - 10)}" width="11" height="11" fill="{r.color}"/>'
                     f'<text x="{_f(x + 16)}" y="{_f(y)}">{escape(r.label)}</text>')
        x += w
    return parts, y + 18


def svg_bars(g: Group) -> Markup:
    """Grouped bars: one group per (task, metric), one bar per run, error bars = 95% CI."""
    runs, cols = g.runs, g.columns
    if not cols:
        return Markup("")
    bw = 14 if len(runs) <= 4 else 10
    gap = 18
    left, right, top_pad, plot_h = 46, 16, 10, 220
    cat_w = len(runs) * bw + gap
    width = max(360, left + right + len(cols) * cat_w)
    legend, legend_bottom = _legend(runs, left, 16, width - left - right)
    top = legend_bottom + top_pad
    height = top + plot_h + 52

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(100.0, v)) / 100)

    p = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{_f(height)}" '
         f'viewBox="0 0 {width} {_f(height)}" role="img" aria-label="Post-edit scores per task and metric">']
    p += legend
    for v in (0, 25, 50, 75, 100):
        p.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(y(v))}" y2="{_f(y(v))}" class="grid"/>'
                 f'<text x="{left - 6}" y="{_f(y(v) + 4)}" text-anchor="end">{v}</text>')
    p.append(f'<text x="12" y="{_f(top + plot_h / 2)}" transform="rotate(-90 12 {_f(top + plot_h / 2)})" '
             f'text-anchor="middle">post-edit %</text>')
    task_spans: dict[str, list[float]] = {}
    for ci, (t, m) in enumerate(cols):
        x0 = left + gap / 2 + ci * cat_w
        for ri, r in enumerate(runs):
            s = r.stat(t, m)
            if s is None or s["post"] is None:
                continue
            bx = x0 + ri * bw
            yy = y(s["post"])
            tip = (f"{r.label} · {t} · {m}: {s['post']:.1f}"
                   + (f" [{s['lo']:.1f}, {s['hi']:.1f}]" if s["lo"] is not None and s["hi"] is not None else "")
                   + (f" n={s['n']}" if s["n"] is not None else ""))
            p.append(f'<rect x="{_f(bx)}" y="{_f(yy)}" width="{bw - 2}" height="{_f(top + plot_h - yy)}" '
                     f'fill="{r.color}"><title>{escape(tip)}</title></rect>')
            if s["lo"] is not None and s["hi"] is not None:
                cx = bx + (bw - 2) / 2
                y1, y2 = y(s["lo"]), y(s["hi"])
                p.append(f'<path class="err" d="M{_f(cx)} {_f(y1)}V{_f(y2)}M{_f(cx - 3)} {_f(y1)}H{_f(cx + 3)}'
                         f'M{_f(cx - 3)} {_f(y2)}H{_f(cx + 3)}"/>')
        mid = x0 + (len(runs) * bw - 2) / 2
        p.append(f'<text x="{_f(mid)}" y="{_f(top + plot_h + 16)}" text-anchor="middle">'
                 f'{escape(METRIC_ABBR.get(m, m))}</text>')
        span = task_spans.setdefault(t, [x0, x0])
        span[1] = x0 + len(runs) * bw - 2
    for t, (a, b) in task_spans.items():
        p.append(f'<line x1="{_f(a)}" x2="{_f(b)}" y1="{_f(top + plot_h + 24)}" y2="{_f(top + plot_h + 24)}" class="axis"/>'
                 f'<text x="{_f((a + b) / 2)}" y="{_f(top + plot_h + 40)}" text-anchor="middle" class="task">'
                 f'{escape(t)}</text>')
    p.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(top + plot_h)}" y2="{_f(top + plot_h)}" class="axis"/>')
    p.append("</svg>")
    return Markup("".join(p))


def svg_scatter(g: Group) -> Markup:
    """Reliability (x) versus locality (y): a filled point per run (mean over tasks) and a small
    hollow point per run and task."""
    pts = []  # (run, task or None, rel, loc)
    for r in g.runs:
        rels, locs = [], []
        for t in r.tasks:
            a, b = r.stat(t, "reliability"), r.stat(t, "locality")
            if a and b and a["post"] is not None and b["post"] is not None:
                pts.append((r, t, a["post"], b["post"]))
                rels.append(a["post"])
                locs.append(b["post"])
        if rels:
            pts.append((r, None, sum(rels) / len(rels), sum(locs) / len(locs)))
    if not pts:
        return Markup('<p class="muted">No run has both reliability and locality.</p>')
    def axis(vals):  # lower bound and step giving round tick values up to 100
        lo = min(min(vals), 95.0)
        step = 5 if lo >= 75 else 10 if lo >= 40 else 20
        return math.floor(lo / step) * step, step

    (lo_x, step_x), (lo_y, step_y) = axis([p[2] for p in pts]), axis([p[3] for p in pts])
    size, left, top, right = 320, 54, 16, 220
    width, height = left + size + right, top + size + 46

    def sx(v):
        return left + size * (v - lo_x) / (100 - lo_x)

    def sy(v):
        return top + size * (1 - (v - lo_y) / (100 - lo_y))

    p = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" role="img" aria-label="Reliability versus locality">']
    for vx in range(int(lo_x), 101, step_x):
        p.append(f'<line x1="{_f(sx(vx))}" x2="{_f(sx(vx))}" y1="{top}" y2="{top + size}" class="grid"/>'
                 f'<text x="{_f(sx(vx))}" y="{top + size + 16}" text-anchor="middle">{vx}</text>')
    for vy in range(int(lo_y), 101, step_y):
        p.append(f'<line x1="{left}" x2="{left + size}" y1="{_f(sy(vy))}" y2="{_f(sy(vy))}" class="grid"/>'
                 f'<text x="{left - 6}" y="{_f(sy(vy) + 4)}" text-anchor="end">{vy}</text>')
    p.append(f'<rect x="{left}" y="{top}" width="{size}" height="{size}" class="frame"/>')
    p.append(f'<text x="{left + size / 2}" y="{top + size + 36}" text-anchor="middle">reliability % (post)</text>')
    p.append(f'<text x="14" y="{top + size / 2}" transform="rotate(-90 14 {top + size / 2})" '
             f'text-anchor="middle">locality % (post)</text>')
    p.append(f'<text x="{left + size - 6}" y="{top + 14}" text-anchor="end" class="muted">better ↗</text>')
    for r, t, a, b in pts:
        tip = f"{r.label} · {t or 'mean over tasks'}: reliability {a:.1f}, locality {b:.1f}"
        if t is None:
            p.append(f'<circle cx="{_f(sx(a))}" cy="{_f(sy(b))}" r="6" fill="{r.color}" stroke="#222">'
                     f'<title>{escape(tip)}</title></circle>')
        else:
            p.append(f'<circle cx="{_f(sx(a))}" cy="{_f(sy(b))}" r="3.5" fill="none" stroke="{r.color}" '
                     f'stroke-width="1.5"><title>{escape(tip)}</title></circle>')
    # legend on the right (labels beside the plot never overlap the points)
    ly = top + 10
    for r in g.runs:
        p.append(f'<circle cx="{left + size + 20}" cy="{ly - 4}" r="5" fill="{r.color}" stroke="#222"/>'
                 f'<text x="{left + size + 30}" y="{ly}">{escape(r.label)}</text>')
        ly += 18
    p.append(f'<circle cx="{left + size + 20}" cy="{ly + 6}" r="3.5" fill="none" stroke="#555" stroke-width="1.5"/>'
             f'<text x="{left + size + 30}" y="{ly + 10}" class="muted">one task</text>'
             f'<circle cx="{left + size + 20}" cy="{ly + 24}" r="5" fill="#999" stroke="#222"/>'
             f'<text x="{left + size + 30}" y="{ly + 28}" class="muted">mean over tasks</text>')
    p.append("</svg>")
    return Markup("".join(p))


# --------------------------------------------------------------------------------------------
# Drill-down data
# --------------------------------------------------------------------------------------------

def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _probes(rec: dict, case: dict) -> list[dict]:
    preds = rec.get("predictions") if isinstance(rec.get("predictions"), dict) else {}
    pre = preds.get("pre") if isinstance(preds.get("pre"), dict) else {}
    post = preds.get("post") if isinstance(preds.get("post"), dict) else {}

    def pick(d, key, i):
        v = d.get(key)
        if isinstance(v, list):
            return v[i] if i < len(v) else None
        return v if i == 0 else None

    out = [{"kind": "prompt", "prompt": case.get("prompt"), "expected": case.get("target_new"),
            "pre": pick(pre, "prompt", 0), "post": pick(post, "prompt", 0)}]
    for i, q in enumerate(_as_list(case.get("rephrase_prompts"))):
        out.append({"kind": "rephrase", "prompt": q, "expected": case.get("target_new"),
                     "pre": pick(pre, "rephrase", i), "post": pick(post, "rephrase", i)})
    for kind in ("locality", "portability"):
        for i, q in enumerate(_as_list(case.get(kind))):
            q = q if isinstance(q, dict) else {"prompt": q, "answer": None}
            out.append({"kind": kind, "prompt": q.get("prompt"), "expected": q.get("answer"),
                         "pre": pick(pre, kind, i), "post": pick(post, kind, i)})
    return out


def _case_rows(run: Run, task: str, case_text: bool = True) -> list[dict]:
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
        rel = _num((post or {}).get("reliability"))
        error = rec.get("error")
        failed = bool(error) or post is None or (rel is not None and rel < 1)
        metrics = [m for m in METRICS if m in pre or (post and m in post)]
        metrics += [m for m in list(pre) + list(post or {}) if m not in metrics]
        metrics = list(dict.fromkeys(metrics))
        rows.append({"case_id": rec.get("case_id"), "case": case, "error": error, "failed": failed,
                     "scores": [(m, _num(pre.get(m)), _num((post or {}).get(m))) for m in metrics],
                     "probes": _probes(rec, case)})
    return rows


def _task_file(run: Run, task: str) -> str:
    return f"cases-{run.slug}-{_slugify(task)}.html"


# --------------------------------------------------------------------------------------------
# JSON / CSV / Markdown
# --------------------------------------------------------------------------------------------

def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def _json_doc(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict, cmp: dict) -> dict:
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
            gd["rows"].append({"rank": row["rank"], "run": r.label, "editor": r.editor,
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
        doc["groups"].append(gd)
    return doc


def _csv_frame(groups: list[Group], ov: dict) -> pd.DataFrame:
    records, cols = [], ["group", "rank", "run", "editor", "model", "source_hash", "metric_definitions", "run_dir"]
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
                                   "model": g.model_spec, "source_hash": g.model_hash,
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


def _md_escape(s: Any) -> str:
    return re.sub(r"([\\|<>*_`\[\]])", r"\\\1", str(s)).replace("\n", " ")


def _md_num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _markdown(title: str, baseline: str | None, groups: list[Group], ov: dict, ho: dict, cmp: dict) -> str:
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
            L.append("| " + " | ".join([str(row["rank"] or "–"), _md_escape(row["run"].label)] + cells
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
    return "\n".join(L).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

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


def _run_details(r: Run) -> dict:
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
    _case_rows). Raises BenchError for unusable input (missing/malformed run files, no runs)."""
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
    _assign_labels(runs)
    groups = _make_groups(runs)
    ov = {g.gid: _overview(g) for g in groups}
    ho = {g.gid: _holdout_view(g) for g in groups}
    cmp = {g.gid: _comparison(g, baseline) for g in groups}

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create {out_dir}: {e.strerror}") from None

    doc = _json_doc(title, baseline, groups, ov, ho, cmp)
    (out_dir / "leaderboard.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _csv_frame(groups, ov).to_csv(out_dir / "leaderboard.csv", index=False)

    main: Path | None = None
    if fmt in ("md", "all"):
        main = out_dir / "leaderboard.md"
        main.write_text(_markdown(title, baseline, groups, ov, ho, cmp), encoding="utf-8")
    if fmt in ("html", "all"):
        env = _env()
        generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        page = env.get_template("index.html.j2").render(
            title=title, generated=generated, baseline=baseline, runs=runs,
            groups=[{"g": g, "overview": ov[g.gid], "holdout": ho[g.gid], "cmp": cmp[g.gid],
                     "bars": svg_bars(g), "scatter": svg_scatter(g)} for g in groups],
            details={r.slug: _run_details(r) for r in runs}, task_file=_task_file)
        main = out_dir / "index.html"
        main.write_text(page, encoding="utf-8")
        tpl = env.get_template("cases.html.j2")
        for r in runs:
            tasks = list(dict.fromkeys(r.tasks + [str(c.get("task")) for c in r.cases]))
            for t in tasks:
                rows = _case_rows(r, t, case_text)
                (out_dir / _task_file(r, t)).write_text(tpl.render(
                    title=title, run=r, task=t, rows=rows, n_failed=sum(x["failed"] for x in rows),
                    case_text=case_text,
                    has_cases_file=r.has_cases_file, holdout=r.holdout(t), generated=generated), encoding="utf-8")
    assert main is not None
    return main
