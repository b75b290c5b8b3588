"""The leave-one-task-out matrix (`bench holdout-matrix`, docs/holdout.md): for each held-out
task, every editor's scores on it (trained on the other tasks only) and the paired difference of
the first editor minus each other one, per metric; with `--multitask`, a column where no task is
held out (every editor trained on all, evaluated on each task and on their mean).

The matrix file (matrix.json, written by bench.holdout) names one run directory per (held-out
task or "none", editor, instruction mode, training seed), relative to its own folder; a v1 file
(one seed, no seed level) is read as a v2 one. With one seed the statistics are the report's one
statistic (reports.stats, through reports.compare.Pairing): the difference over the cases both
runs finished, its 95% paired-bootstrap interval and the p-value read off the same resamples;
with several seeds, and for the multi-task mean row, reports.seeded's hierarchical bootstrap. The
marks are Holm-adjusted over every difference of the matrix, as in the report's other tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.io import read_json
from reports.runs import Run, scrub_paths
from reports.hierarchical import verdict
from reports.seeded import MEAN_ROW, MULTITASK, MULTITASK_RULE, SEEDS_RULE, SeededStats, multitask_summary, seed_table
from reports.stats import adjust_marks, comparison_text
from reports.compare import Pairing
from reports.groups import COMPOSITES, METRIC_ABBR, Column, composite_cell, family_of, make_groups

MATRIX_FILE = "matrix.json"
MATRIX_FORMAT = "instructedit-bench/holdout-matrix/v2"
MATRIX_FORMAT_V1 = "instructedit-bench/holdout-matrix/v1"  # one seed: runs[task][editor][mode] = directory
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

    holdout: str  # a task, or MULTITASK (none held out)
    editor: str
    instruction: str  # "seen", "unseen", or NO_INSTRUCTION
    run_dir: str  # relative to the matrix file's folder
    seed: int = 0  # the training seed

    @property
    def label(self) -> str:
        return self.editor if self.instruction == NO_INSTRUCTION else f"{self.editor} ({self.instruction})"


def _text_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise BenchError(f"{where}: expected a non-empty list of names")
    return list(value)


def _as_v2(doc: dict) -> dict:
    """A v1 matrix (one seed, `seed`) in v2's shape: a seed level under each instruction mode."""
    seed = str(doc.get("seed") if isinstance(doc.get("seed"), int) else 0)
    runs = doc.get("runs")
    if isinstance(runs, dict):
        runs = {t: {e: {m: {seed: d} for m, d in by_mode.items()} if isinstance(by_mode, dict) else by_mode
                    for e, by_mode in by_editor.items()} if isinstance(by_editor, dict) else by_editor
                for t, by_editor in runs.items()}
    training = doc.get("training") if isinstance(doc.get("training"), dict) else {}
    training = {t: {e: {seed: x} for e, x in by.items()} for t, by in training.items() if isinstance(by, dict)}
    return {**doc, "format": MATRIX_FORMAT, "seeds": [int(seed)], "runs": runs, "training": training,
            "multitask": False}


def read_matrix(path: Path) -> dict:
    """The content of a matrix.json, checked (a v1 file in v2's shape): BenchError naming the
    file when it is not one."""
    path = Path(path)
    doc = read_json(path, "matrix file")
    if not isinstance(doc, dict) or doc.get("format") not in (MATRIX_FORMAT, MATRIX_FORMAT_V1):
        raise BenchError(f"{path}: not an {MATRIX_FORMAT} file (as bench holdout-matrix writes)")
    if doc["format"] == MATRIX_FORMAT_V1:
        doc = _as_v2(doc)
    _text_list(f"{path}: editors", doc.get("editors"))
    tasks = _text_list(f"{path}: tasks", doc.get("tasks"))
    seeds = doc.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise BenchError(f"{path}: seeds must be a non-empty list of integers")
    columns = doc.get("columns")
    if columns is None:
        columns = list(tasks) + ([MULTITASK] if doc.get("multitask") else [])
    if not isinstance(columns, list) or not all(c in tasks or c == MULTITASK for c in columns):
        raise BenchError(f"{path}: columns must name tasks of the matrix or {MULTITASK!r}")
    runs = doc.get("runs")
    ok = isinstance(runs, dict) and all(
        isinstance(by_editor, dict) and all(
            isinstance(by_mode, dict) and all(
                isinstance(by_seed, dict) and all(
                    str(s).lstrip("-").isdigit() and isinstance(d, str) and d and Path(d).name == d
                    for s, d in by_seed.items())
                for by_seed in by_mode.values())
            for by_mode in by_editor.values())
        for by_editor in runs.values())
    if not ok:
        raise BenchError(f"{path}: runs must map held-out task -> editor -> instruction mode -> seed -> "
                         "run directory name (in the matrix file's folder)")
    return {**doc, "columns": columns, "multitask": MULTITASK in columns}


def entries(doc: dict) -> list[Entry]:
    """The matrix's runs, column by column (held-out tasks, then "none"), editors in the
    matrix's order, seeds in order."""
    out = []
    for column in doc["columns"]:
        for editor in doc["editors"]:
            for mode, by_seed in (doc["runs"].get(column, {}).get(editor) or {}).items():
                for seed, run_dir in sorted(by_seed.items(), key=lambda x: int(x[0])):
                    out.append(Entry(column, editor, mode, run_dir, int(seed)))
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


class _Cells:
    """The statistics of the matrix's cells, from the runs its entries name (`found`): with one
    seed and one task, the report's own statistic and paired comparison (runs compared within
    their report group); otherwise reports.seeded's, over seeds and cases."""

    def __init__(self, found: dict[Entry, Run], several: bool):
        self.found, self.several = found, several
        self.seeded = SeededStats()
        self._training: dict[int, dict] = {}
        self._pairings = [(set(id(r) for r in g.runs), Pairing(g)) for g in make_groups(list(found.values()))]

    def _compare(self, a: Run, b: Run, task: str, key: str) -> dict | None:
        for members, pairing in self._pairings:
            if id(a) in members and id(b) in members:
                return pairing.compare(a, b, Column(task, key, family_of(key)))
        return None  # different models or modes: no paired comparison

    def training_of(self, r: Run, seed: int) -> dict:
        """What a run's editor trained on, its steps, the step of the network kept and its mean
        Score on its training tasks."""
        if id(r) not in self._training:
            trained = r.train_tasks or []
            self._training[id(r)] = {
                "seed": seed, "run_dir": r.name, "trained_on": trained, "steps": r.notes.get("train_steps"),
                # the network kept is the best validation's: an early one means the validation
                # loss never got lower afterwards (unstable or overfitting)
                "kept_step": (r.notes.get("final_validation") or {}).get("step"),
                "training_score": _mean([(_stat(r, t, "score") or {}).get("post") for t in r.tasks if t in trained])}
        return self._training[id(r)]

    def cell(self, group: dict[int, Entry], tasks: list[str], key: str) -> dict | None:
        if not self.several and len(tasks) == 1:  # one seed, one task: the report's own statistic
            return _stat(self.found[next(iter(group.values()))], tasks[0], key)
        return self.seeded.cell({s: self.found[e] for s, e in group.items()}, tasks, key)

    def difference(self, ga: dict[int, Entry], gb: dict[int, Entry], tasks: list[str], key: str) -> dict | None:
        if not self.several and len(tasks) == 1:
            return self._compare(self.found[next(iter(ga.values()))], self.found[next(iter(gb.values()))],
                                 tasks[0], key)
        return self.seeded.difference({s: self.found[e] for s, e in ga.items()},
                                      {s: self.found[e] for s, e in gb.items()}, tasks, key)


def _matrix_row(cells: _Cells, col_key: str, task: str | None, tasks: list[str], first_editor: str,
                family: list[dict]) -> dict:
    """One row of the matrix: the entries of column `col_key` (one per editor and instruction
    mode, over seeds) evaluated on `tasks`, and their paired differences (added to `family`)."""
    found = cells.found
    groups: dict[tuple[str, str], dict[int, Entry]] = {}
    for e in found:
        if e.holdout == col_key:
            groups.setdefault((e.editor, e.instruction), {})[e.seed] = e
    cols = []
    for group in groups.values():
        seeds = sorted(group)
        first = group[seeds[0]]
        per_seed = [cells.training_of(found[group[s]], s) for s in seeds]
        cols.append({"entry": first, "label": first.label, "run": found[first], "seeds": seeds,
                     "runs": {s: found[group[s]] for s in seeds}, "trained_on": per_seed[0]["trained_on"],
                     "cells": {m: cells.cell(group, tasks, m) for m in MATRIX_METRICS},
                     "training": per_seed,
                     "training_score": _mean([x["training_score"] for x in per_seed]),
                     "steps": per_seed[0]["steps"], "kept_step": per_seed[0]["kept_step"]})
    diffs = []
    for a, b in comparisons([next(iter(g.values())) for g in groups.values()], first_editor):
        ga, gb = groups[(a.editor, a.instruction)], groups[(b.editor, b.instruction)]
        diff_cells = {m: cells.difference(ga, gb, tasks, m) for m in MATRIX_METRICS}
        family += [c for c in diff_cells.values() if c is not None]
        diffs.append({"label": f"{a.label} − {b.label}", "a": a.label, "b": b.label, "cells": diff_cells})
    label = task if col_key != MULTITASK else f"{MULTITASK}: {task or MEAN_ROW}"
    return {"holdout": label, "column": col_key, "task": task, "tasks": tasks, "columns": cols, "diffs": diffs}


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
    seeds = list(doc.get("seeds") or [0])
    several = len(seeds) > 1
    cells = _Cells(found, several)
    # rows: each held-out task (evaluated on it), then the multi-task column on each task and
    # on their mean
    columns = doc.get("columns") or list(doc["tasks"])
    specs = [(t, t, [t]) for t in doc["tasks"] if t in columns]
    if MULTITASK in columns:
        specs += [(MULTITASK, t, [t]) for t in doc["tasks"]] + [(MULTITASK, None, list(doc["tasks"]))]
    family: list[dict] = []
    rows = [_matrix_row(cells, col_key, task, tasks, doc["editors"][0], family) for col_key, task, tasks in specs]
    adjust_marks(family)
    for c in family:
        c["verdict"] = verdict(c)
    n_tests = sum(1 for c in family if c.get("p") is not None)
    rule = MATRIX_RULE.format(n=n_tests)
    if several:
        rule += " " + SEEDS_RULE.format(s=len(seeds), seeds=", ".join(map(str, seeds)))
    if MULTITASK in columns:
        rule += " " + MULTITASK_RULE.format(seeds=" and, with several seeds, the seeds" if several else "")
    view = {"editors": list(doc["editors"]), "tasks": list(doc["tasks"]), "metrics": list(MATRIX_METRICS),
            "labels": list(dict.fromkeys(c["label"] for row in rows for c in row["columns"])),
            "diff_labels": list(dict.fromkeys(d["label"] for row in rows for d in row["diffs"])),
            "rows": rows, "missing": missing, "n_tests": n_tests, "rule": rule, "seeds": seeds,
            "multitask": MULTITASK in columns,
            "command": scrub_paths(doc.get("command")), "training_hparams": doc.get("training_hparams") or {}}
    view["summary"] = multitask_summary(view)
    view["seed_table"] = seed_table(view)
    return view


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
    """Per held-out task (the multi-task column once) and run, per seed when there are several:
    what it trained on, its steps, the step of the network kept (best validation loss), its
    mean Score on those tasks."""
    several = len(view.get("seeds") or []) > 1
    head = ["held out", "run"] + (["seed"] if several else []) + [
        "trained on", "steps", "kept step", "Score on its training tasks"]
    body, done = [], set()
    for row in view["rows"]:
        col_key = row.get("column", row["holdout"])
        for c in row["columns"]:
            if (col_key, c["label"]) in done:
                continue
            done.add((col_key, c["label"]))
            for x in c.get("training") or [c]:
                body.append([col_key, c["label"]] + ([str(x.get("seed"))] if several else []) + [
                    ", ".join(x["trained_on"]) or "–",
                    "–" if x["steps"] is None else str(x["steps"]),
                    "–" if x.get("kept_step") is None else str(x["kept_step"]),
                    "–" if x["training_score"] is None else f"{x['training_score']:.1f}"])
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
    if view.get("seed_table"):
        lines += ["per seed"] + table(*view["seed_table"]) + [""]
    lines += list(view.get("summary") or [])
    lines.append(view["rule"])
    if view["missing"]:
        lines.append(f"missing run directories: {', '.join(view['missing'])}")
    return "\n".join(lines)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def matrix_json(view: dict) -> dict:
    """The matrix in leaderboard.json."""
    def seeds(x):  # several seeds: the per-seed values (and a difference's spread)
        if not x.get("per_seed"):
            return {}
        out = {"per_seed": [_r(v) for v in x["per_seed"]]}
        if "sd_seeds" in x:
            out["sd_seeds"] = _r(x["sd_seeds"])
        return out

    def stat(s):
        return None if s is None else {"post": _r(s.get("post")), "ci": [_r(s.get("lo")), _r(s.get("hi"))],
                                       "n": s.get("n"), **seeds(s)}

    def cmp(c):
        return None if c is None else {"diff": _r(c.get("diff")), "ci": [_r(c.get("lo")), _r(c.get("hi"))],
                                       "p": _r(c.get("p"), 6), "p_holm": _r(c.get("p_holm"), 6),
                                       "mark": c.get("mark", ""), "verdict": c.get("verdict"), "n": c.get("n"),
                                       **seeds(c)}

    def training(x):
        return {"seed": x["seed"], "run_dir": x["run_dir"], "steps": x["steps"], "kept_step": x.get("kept_step"),
                "training_score": _r(x["training_score"])}

    return {"rule": view["rule"], "editors": view["editors"], "tasks": view["tasks"], "metrics": view["metrics"],
            "seeds": view.get("seeds"), "multitask": view.get("multitask", False), "summary": view.get("summary") or [],
            "n_tests": view["n_tests"], "missing": view["missing"], "training_hparams": view["training_hparams"],
            "rows": [{"holdout": row["holdout"], "column": row.get("column"), "task": row.get("task"),
                      "runs": [{"run": c["label"], "run_dir": c["run"].name, "trained_on": c["trained_on"],
                                "steps": c["steps"], "kept_step": c.get("kept_step"), "training_score": _r(c["training_score"]),
                                "seeds": [training(x) for x in c.get("training") or []],
                                "scores": {m: stat(s) for m, s in c["cells"].items()}} for c in row["columns"]],
                      "differences": [{"a": d["a"], "b": d["b"], "scores": {m: cmp(x) for m, x in d["cells"].items()}}
                                      for d in row["diffs"]]}
                     for row in view["rows"]]}
