"""Loading `bench run` directories (docs/run-format.md) for the report, and telling them apart:
each run gets a display label, a slug for file names and anchors, and a chart colour."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.io import read_json
from bench.core.runfiles import RunDir

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def finite_or_none(x: Any) -> float | None:
    """`x` as a float when it is a finite number (not a bool), else None."""
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
    def data(self) -> str:
        """"real", "built-in sample" or "partly built-in sample" (config.json, else summary.json;
        runs from before the marker used real data unless their data_dir says otherwise)."""
        data = self.config.get("data") or self.summary.get("data")
        if isinstance(data, str):
            return data
        return "built-in sample" if self.config.get("data_dir") == "built-in sample" else "real"

    @property
    def sample_data(self) -> bool:
        return self.data != "real"

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
        return {"pre": finite_or_none(s.get("pre")), "post": finite_or_none(s.get("post")),
                "lo": finite_or_none(ci[0]), "hi": finite_or_none(ci[1]),
                "n": s.get("n") if isinstance(s.get("n"), int) else None}

    def case_posts(self) -> dict[tuple[str, str], dict]:
        """(task, case_id) -> post scores, for cases that finished without error."""
        out = {}
        for rec in self.cases:
            if rec.get("error") or not isinstance(rec.get("post"), dict):
                continue
            out[(str(rec["task"]), str(rec["case_id"]))] = rec["post"]
        return out


def _read_run_json(path: Path) -> Any:
    # A missing file most often means the run never finished: say so rather than "not found".
    if not path.is_file():
        raise BenchError(f"{path.parent}: no {path.name} (not a finished run directory?)")
    return read_json(path)


def load_run(path: Path) -> Run:
    """The run in directory `path`. Its cases come from RunDir.read_cases, which drops a torn last
    line (a killed run) without touching the file: the report never modifies a run directory."""
    run_dir = RunDir(Path(path))
    if not run_dir.path.is_dir():
        raise BenchError(f"{run_dir.path}: run directory not found")
    config = _read_run_json(run_dir.config_path)
    summary = _read_run_json(run_dir.summary_path)
    if not isinstance(config, dict):
        raise BenchError(f"{run_dir.config_path}: expected a JSON object")
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise BenchError(f"{run_dir.summary_path}: expected a JSON object with a 'tasks' object")
    for task, metrics in summary["tasks"].items():
        if not isinstance(metrics, dict):
            raise BenchError(f"{run_dir.summary_path}: tasks.{task} is not an object")
    return Run(run_dir.path, config, summary, run_dir.read_cases(), run_dir.cases_path.is_file())


def slugify(s: str) -> str:
    """`s` reduced to characters that are safe in a file name and an HTML anchor."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.") or "x"


def assign_labels(runs: list[Run]) -> None:
    """Label = editor name; when an editor has several runs, add the run directory's name
    (without a leading '<editor>-') so the rows can be told apart. Also sets each run's slug
    (unique, case-insensitively) and colour."""
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
        base = slugify(r.label)
        slug, k = base, 2
        while slug.lower() in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug.lower())
        r.slug = slug
        r.color = PALETTE[i % len(PALETTE)]
