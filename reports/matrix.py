"""The leave-one-task-out matrix (`bench holdout-matrix`, docs/holdout.md): for each held-out
task, every editor's scores on it (trained on the other tasks only) and the paired difference of
the first editor minus each other one, per metric.

The matrix file (matrix.json, written by bench.holdout) names one run directory per (held-out
task, editor, instruction mode), relative to its own folder. The statistics are the report's one
statistic (reports.stats, through reports.views.Pairing): the difference over the cases both runs
finished, its 95% paired-bootstrap interval and the p-value read off the same resamples; the
marks are Holm-adjusted over every difference of the matrix, as in the report's other tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.io import read_json
from reports.runs import Run, scrub_paths
from reports.stats import adjust_marks, comparison_text
from reports.views import COMPOSITES, METRIC_ABBR, Column, Pairing, composite_cell, family_of, make_groups

MATRIX_FILE = "matrix.json"
MATRIX_FORMAT = "instructedit-bench/holdout-matrix/v1"
NO_INSTRUCTION = "none"  # the instruction-mode key of an editor that uses no instructions
INSTRUCTION_MODES = ("seen", "unseen")
# What each held-out task is judged on: the teacher-forced terms and their composite (Score)
MATRIX_METRICS = ("score", "reliability", "generality", "locality")
MATRIX_RULE = ("Each editor trained on every task but the held-out one (same steps, batch mixture and "
               "seed for all editors) and was evaluated on the held-out task. Difference = first editor "
               "minus the other, in points, over the cases both runs finished, with its 95% paired "
               "bootstrap interval (2,000 resamples of the shared cases) and the p-value read off the "
               "same resamples (p < 0.05 exactly when the interval excludes 0); marks Holm-adjusted over "
               "the {n} differences of the matrix: ▲/▼ survives the adjustment, △/▽ excludes 0 only "
               "before it, · the interval contains 0.")


@dataclass(frozen=True)
class Entry:
    """One run of the matrix: `editor` evaluated on the held-out task `holdout`."""

    holdout: str
    editor: str
    instruction: str  # "seen", "unseen", or NO_INSTRUCTION
    run_dir: str  # relative to the matrix file's folder

    @property
    def label(self) -> str:
        return self.editor if self.instruction == NO_INSTRUCTION else f"{self.editor} ({self.instruction})"


def _text_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise BenchError(f"{where}: expected a non-empty list of names")
    return list(value)


def read_matrix(path: Path) -> dict:
    """The content of a matrix.json, checked: BenchError naming the file when it is not one."""
    path = Path(path)
    doc = read_json(path, "matrix file")
    if not isinstance(doc, dict) or doc.get("format") != MATRIX_FORMAT:
        raise BenchError(f"{path}: not an {MATRIX_FORMAT} file (as bench holdout-matrix writes)")
    _text_list(f"{path}: editors", doc.get("editors"))
    _text_list(f"{path}: tasks", doc.get("tasks"))
    runs = doc.get("runs")
    ok = isinstance(runs, dict) and all(
        isinstance(by_editor, dict) and all(
            isinstance(by_mode, dict) and all(isinstance(d, str) and d and Path(d).name == d
                                              for d in by_mode.values())
            for by_mode in by_editor.values())
        for by_editor in runs.values())
    if not ok:
        raise BenchError(f"{path}: runs must map held-out task -> editor -> instruction mode -> "
                         "run directory name (in the matrix file's folder)")
    return doc


def entries(doc: dict) -> list[Entry]:
    """The matrix's runs, held-out task by held-out task, editors in the matrix's order."""
    out = []
    for task in doc["tasks"]:
        for editor in doc["editors"]:
            for mode, run_dir in (doc["runs"].get(task, {}).get(editor) or {}).items():
                out.append(Entry(task, editor, mode, run_dir))
    return out


def run_dirs(doc: dict, folder: Path) -> list[Path]:
    """The run directories a matrix names (they live beside its file)."""
    return [Path(folder) / e.run_dir for e in entries(doc)]


def comparisons(row: list[Entry], first: str) -> list[tuple[Entry, Entry]]:
    """(a, b) pairs of one held-out task: the first editor minus each other editor. An editor
    without instructions is compared with every mode of one that has them; two editors that both
    have them, mode by mode."""
    out = []
    for a in (e for e in row if e.editor == first):
        for b in (e for e in row if e.editor != first):
            plain = NO_INSTRUCTION in (a.instruction, b.instruction)
            if plain or a.instruction == b.instruction:
                out.append((a, b))
    return out


def _stat(run: Run, task: str, key: str) -> dict | None:
    """{'post','lo','hi','n'} of a run on a task: a metric from summary.json, the composite from
    the run's cases (as the report's cells)."""
    if key in COMPOSITES:
        return composite_cell(run, task, key)
    return run.stat(task, key)


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def matrix_view(doc: dict, folder: Path, runs: list[Run]) -> dict:
    """What the matrix shows, from its document and the loaded runs (those it names are found by
    their directory): per held-out task, each entry's scores and its mean Score on the tasks it
    trained on, and the paired differences; Holm over every difference of the matrix."""
    by_path = {r.path.resolve(): r for r in runs}
    found: dict[Entry, Run] = {}
    missing = []
    for e in entries(doc):
        r = by_path.get((Path(folder) / e.run_dir).resolve())
        if r is None:
            missing.append(e.run_dir)
        else:
            found[e] = r
    # the one pairing of the report: runs compared within their group (same model, mode, format)
    pairings = [(set(id(r) for r in g.runs), Pairing(g)) for g in make_groups(list(found.values()))]

    def compare(a: Run, b: Run, task: str, key: str) -> dict | None:
        for members, pairing in pairings:
            if id(a) in members and id(b) in members:
                return pairing.compare(a, b, Column(task, key, family_of(key)))
        return None  # different models or modes: no paired comparison

    rows, family = [], []
    for task in doc["tasks"]:
        row = [e for e in found if e.holdout == task]
        cols = []
        for e in row:
            r = found[e]
            trained = r.train_tasks or []
            cols.append({"entry": e, "label": e.label, "run": r, "trained_on": trained,
                         "cells": {m: _stat(r, task, m) for m in MATRIX_METRICS},
                         "training_score": _mean([(_stat(r, t, "score") or {}).get("post")
                                                  for t in r.tasks if t in trained]),
                         "steps": r.notes.get("train_steps"),
                         # the network kept is the best validation's: an early one means the
                         # validation loss never got lower afterwards (unstable or overfitting)
                         "kept_step": (r.notes.get("final_validation") or {}).get("step")})
        diffs = []
        for a, b in comparisons(row, doc["editors"][0]):
            cells = {m: compare(found[a], found[b], task, m) for m in MATRIX_METRICS}
            family += [c for c in cells.values() if c is not None]
            diffs.append({"label": f"{a.label} − {b.label}", "a": a.label, "b": b.label, "cells": cells})
        rows.append({"holdout": task, "columns": cols, "diffs": diffs})
    adjust_marks(family)
    n_tests = sum(1 for c in family if c.get("p") is not None)
    labels = list(dict.fromkeys(c["label"] for row in rows for c in row["columns"]))
    diff_labels = list(dict.fromkeys(d["label"] for row in rows for d in row["diffs"]))
    return {"editors": list(doc["editors"]), "tasks": list(doc["tasks"]), "metrics": list(MATRIX_METRICS),
            "labels": labels, "diff_labels": diff_labels, "rows": rows, "missing": missing,
            "n_tests": n_tests, "rule": MATRIX_RULE.format(n=n_tests),
            "command": scrub_paths(doc.get("command")), "training_hparams": doc.get("training_hparams") or {}}


def column(row: dict, label: str) -> dict | None:
    return next((c for c in row["columns"] if c["label"] == label), None)


def diff(row: dict, label: str) -> dict | None:
    return next((d for d in row["diffs"] if d["label"] == label), None)


# --------------------------------------------------------------------------------------------
# Text (bench holdout-matrix prints it) and the exports
# --------------------------------------------------------------------------------------------

def stat_text(s: dict | None) -> str:
    if s is None or s.get("post") is None:
        return "–"
    ci = "" if s.get("lo") is None else f" [{s['lo']:.1f}, {s['hi']:.1f}]"
    return f"{s['post']:.1f}{ci}"


def metric_grid(view: dict) -> list[dict]:
    """Per metric: {'metric', 'title', 'rows': [{'holdout', 'stats': [per run label],
    'diffs': [per difference label]}]} (None where a held-out task lacks that run)."""
    out = []
    for m in view["metrics"]:
        rows = [{"holdout": row["holdout"],
                 "stats": [(column(row, lab) or {}).get("cells", {}).get(m) for lab in view["labels"]],
                 "diffs": [(diff(row, lab) or {}).get("cells", {}).get(m) for lab in view["diff_labels"]]}
                for row in view["rows"]]
        if m in COMPOSITES:
            label, _, terms, _ = COMPOSITES[m]
            title = f"{label} (harmonic mean of {', '.join(METRIC_ABBR[t] for t in terms)})"
        else:
            title = f"{m} ({METRIC_ABBR.get(m, m)})"
        out.append({"metric": m, "title": f"{title} on the held-out task", "rows": rows})
    return out


def metric_tables(view: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per metric: held-out task x (each run, each difference), as text."""
    head = ["held out"] + view["labels"] + view["diff_labels"]
    return [(g["title"], head, [[r["holdout"]] + [stat_text(s) for s in r["stats"]]
                                + [comparison_text(c) for c in r["diffs"]] for r in g["rows"]])
            for g in metric_grid(view)]


def training_table(view: dict) -> tuple[list[str], list[list[str]]]:
    """Per held-out task and run: what it trained on, its steps, the step of the network kept
    (best validation loss), its mean Score on those tasks."""
    head = ["held out", "run", "trained on", "steps", "kept step", "Score on its training tasks"]
    body = []
    for row in view["rows"]:
        for c in row["columns"]:
            body.append([row["holdout"], c["label"], ", ".join(c["trained_on"]) or "–",
                         "–" if c["steps"] is None else str(c["steps"]),
                         "–" if c.get("kept_step") is None else str(c["kept_step"]),
                         "–" if c["training_score"] is None else f"{c['training_score']:.1f}"])
    return head, body


def format_matrix(view: dict) -> str:
    """The matrix as plain text tables (what `bench holdout-matrix` prints at the end)."""
    def table(head: list[str], body: list[list[str]]) -> list[str]:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body]

    lines = []
    for title, head, body in metric_tables(view):
        lines += [title] + table(head, body) + [""]
    lines += ["training"] + table(*training_table(view)) + [""]
    lines.append(view["rule"])
    if view["missing"]:
        lines.append(f"missing run directories: {', '.join(view['missing'])}")
    return "\n".join(lines)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def matrix_json(view: dict) -> dict:
    """The matrix in leaderboard.json."""
    def stat(s):
        return None if s is None else {"post": _r(s.get("post")), "ci": [_r(s.get("lo")), _r(s.get("hi"))],
                                       "n": s.get("n")}

    def cmp(c):
        return None if c is None else {"diff": _r(c.get("diff")), "ci": [_r(c.get("lo")), _r(c.get("hi"))],
                                       "p": _r(c.get("p"), 6), "p_holm": _r(c.get("p_holm"), 6),
                                       "mark": c.get("mark", ""), "n": c.get("n")}

    return {"rule": view["rule"], "editors": view["editors"], "tasks": view["tasks"], "metrics": view["metrics"],
            "n_tests": view["n_tests"], "missing": view["missing"], "training_hparams": view["training_hparams"],
            "rows": [{"holdout": row["holdout"],
                      "runs": [{"run": c["label"], "run_dir": c["run"].name, "trained_on": c["trained_on"],
                                "steps": c["steps"], "kept_step": c.get("kept_step"), "training_score": _r(c["training_score"]),
                                "scores": {m: stat(s) for m, s in c["cells"].items()}} for c in row["columns"]],
                      "differences": [{"a": d["a"], "b": d["b"], "scores": {m: cmp(x) for m, x in d["cells"].items()}}
                                      for d in row["diffs"]]}
                     for row in view["rows"]]}
