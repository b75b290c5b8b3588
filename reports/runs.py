"""Loading `bench run` directories (docs/run-format.md) for the report, and telling them apart:
each run gets a display label, a slug for file names and anchors, a chart colour and a marker.

Colours and markers are fixed per editor name (docs/report.md, "Colours"): the palette was
chosen so that every pair differs by a CIEDE2000 distance of at least 16 under normal vision and
simulated deuteranopia, protanopia and tritanopia (Machado et al. 2009, severity 1), and every
colour has at least 3:1 contrast on white. tests/test_reports.py recomputes both."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.core.errors import BenchError
from bench.core.io import read_json
from bench.core.runfiles import RunDir, completeness

REFERENCE_EDITOR = "none"  # the no-edit editor: a reference line, never ranked
REFERENCE_COLOR = "#6b6b6b"
PALETTE = ("#005a96", "#a51e2d", "#00a569", "#a569ff", "#ff0f00", "#d278a5")
EDITOR_COLORS = {"ft": PALETTE[0], "rome": PALETTE[1], "mend": PALETTE[2], "instructedit": PALETTE[3],
                 "memit": PALETTE[4], "alphaedit": PALETTE[5], REFERENCE_EDITOR: REFERENCE_COLOR}
MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "hexagon")
EDITOR_MARKERS = {"ft": "circle", "rome": "square", "mend": "triangle", "instructedit": "diamond",
                  "memit": "triangle-down", "alphaedit": "hexagon", REFERENCE_EDITOR: "cross"}
# An absolute path (POSIX, home-relative or a Windows drive) at the start of a word.
_ABS_PATH = re.compile(r"""(?<![^\s=("'\[,])(?:~?/(?!/)|[A-Za-z]:\\)[^\s"'(),\[\]]*""")


def finite_or_none(x: Any) -> float | None:
    """`x` as a float when it is a finite number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def scrub_paths(x: Any) -> Any:
    """`x` (a string, or lists/dicts of them) with every absolute path shortened to '…/<last
    component>': a committed report must not carry one machine's directory layout."""
    if isinstance(x, str):
        return _ABS_PATH.sub(lambda m: "…/" + re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1], x)
    if isinstance(x, list):
        return [scrub_paths(v) for v in x]
    if isinstance(x, dict):
        return {k: scrub_paths(v) for k, v in x.items()}
    return x


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    cases: list[dict]
    has_cases_file: bool
    summary_rebuilt: bool = False  # no summary.json (a SIGKILLed run): rebuilt from cases.jsonl
    label: str = ""
    slug: str = ""
    color: str = PALETTE[0]
    marker: str = MARKERS[0]

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
    def reference(self) -> bool:
        """The no-edit run: shown as the line every editor must beat, not as a competitor."""
        return self.editor == REFERENCE_EDITOR

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
    def mode(self) -> str:
        """"single" (each edit alone, restored) or "sequential" (every edit kept)."""
        sc = self.summary.get("config") if isinstance(self.summary.get("config"), dict) else {}
        return str(self.config.get("mode") or sc.get("mode") or "single")

    @property
    def comparison_key(self) -> tuple:
        """What must be equal for two runs to be ranked together (one group of the report)."""
        return (self.model_spec, self.model_hash, self.metric_definitions, self.mode, self.prompt_format)

    @property
    def prompt_format(self) -> str:
        return str(self.config.get("prompt_format") or "plain")

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
    def notes(self) -> dict:
        n = self.config.get("notes")
        return n if isinstance(n, dict) else {}

    @property
    def train_tasks(self) -> list[str] | None:
        """The tasks a learned editor trained on (its notes' `train_tasks`); None for an editor
        that does not train, for which every task is unseen."""
        t = self.notes.get("train_tasks")
        return [str(x) for x in t] if isinstance(t, list) else None

    def unseen(self, task: str) -> bool:
        """True when the run's editor never trained on `task`: held out of a learned editor's
        training, or any task of an editor that does not train."""
        train = self.train_tasks
        return train is None or task not in train or self.holdout(task)

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

    # ---- completeness --------------------------------------------------------------------

    def case_counts(self) -> dict[str, tuple[int, int | None]]:
        """Task -> (finished cases, planned cases) of every task the run planned (config.json)
        or has results for. Finished: the task's records in cases.jsonl (else summary.json's
        `task_info.n_cases`); planned: config.json's `n_cases` (else `task_info.planned_cases`),
        None when unknown."""
        info = self.summary.get("task_info") if isinstance(self.summary.get("task_info"), dict) else {}
        have = self.summary.get("tasks") if isinstance(self.summary.get("tasks"), dict) else {}
        names = [str(t.get("name")) for t in self.config_tasks] + [str(t) for t in have]
        counted: dict[str, int] = {}
        for rec in self.cases:
            counted[str(rec.get("task"))] = counted.get(str(rec.get("task")), 0) + 1
        out: dict[str, tuple[int, int | None]] = {}
        for name in dict.fromkeys(names):
            ti = info.get(name) if isinstance(info.get(name), dict) else {}
            cfg = next((t for t in self.config_tasks if str(t.get("name")) == name), {})
            planned = cfg.get("n_cases", ti.get("planned_cases"))
            planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None
            if self.has_cases_file:
                finished = counted.get(name, 0)
            else:
                n = ti.get("n_cases")
                finished = n if isinstance(n, int) and not isinstance(n, bool) else (planned or 0)
            out[name] = (finished, planned)
        return out

    @property
    def finished_cases(self) -> int:
        return sum(f for f, _ in self.case_counts().values())

    @property
    def planned_cases(self) -> int:
        return sum(p if p is not None else f for f, p in self.case_counts().values())

    @property
    def complete(self) -> bool:
        """Every planned case of every planned task finished, and summary.json does not say
        otherwise (`complete`: false, written by a stopped run; a sequential run whose last
        checkpoint is missing). An incomplete run is listed but never ranked."""
        if self.summary.get("complete") is False or not completeness(self.summary)["complete"]:
            return False
        return all(p is None or f >= p for f, p in self.case_counts().values())

    @property
    def incomplete_mark(self) -> str:
        """'incomplete (n of N cases)', or '' for a complete run."""
        if self.complete:
            return ""
        return f"incomplete ({self.finished_cases} of {self.planned_cases} cases)"

    @property
    def incomplete_detail(self) -> str:
        """Per task 'task n/N' and how the summary came about: the mark's tooltip."""
        parts = [f"{t} {f}/{p if p is not None else '?'}" for t, (f, p) in self.case_counts().items()]
        how = ("summary rebuilt from cases.jsonl (the run was stopped before it wrote summary.json)"
               if self.summary_rebuilt else "the run was stopped before it finished")
        return f"{how}; finished/planned cases: {', '.join(parts)}; not ranked"

    def holdout(self, task: str) -> bool:
        """The task is flagged held out (--holdout) in config.json or summary.json."""
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

    # ---- provenance ----------------------------------------------------------------------

    @property
    def extended(self) -> list[dict]:
        """`bench run --resume` extensions recorded in config.json: [{'limit', 'at'}]."""
        e = self.config.get("extended")
        return [x for x in e if isinstance(x, dict)] if isinstance(e, list) else []

    @property
    def hparam_overrides(self) -> dict | None:
        """The hyperparameters set for this run (--hparam / --hparams-file): those that differ
        from the editor's defaults. None when the run did not record its options."""
        opts = self.config.get("options")
        if not isinstance(opts, dict):
            return None
        h = opts.get("hparams")
        return dict(h) if isinstance(h, dict) else {}

    # ---- cost ----------------------------------------------------------------------------

    def edit_seconds(self, task: str | None = None) -> list[float]:
        """Seconds per edit of every finished case (of `task`, or all). Edits an editor computes
        in one call (`time.edits_together` = k: the first case carries the joint time) share
        that call's time equally, so each case gets the call's mean."""
        out: list[float] = []
        chunk: list[float] = []
        size = 0

        def flush() -> None:
            nonlocal chunk, size
            if chunk:
                out.extend([sum(chunk) / len(chunk)] * len(chunk))
            chunk, size = [], 0

        for rec in self.cases:
            t = rec.get("time") if isinstance(rec.get("time"), dict) else {}
            s = finite_or_none(t.get("edit_s"))
            if rec.get("error") or s is None or (task is not None and str(rec.get("task")) != task):
                continue
            k = t.get("edits_together")
            if isinstance(k, int) and k > 1:
                if size != k or len(chunk) >= k:
                    flush()
                    size = k
                chunk.append(s)
                continue
            flush()
            out.append(s)
        flush()
        return out

    def median_edit_s(self, task: str | None = None) -> float | None:
        xs = self.edit_seconds(task)
        return float(statistics.median(xs)) if xs else None

    def peak_memory_mb(self) -> float | None:
        """The largest peak memory a case record reports (`time.peak_mem_mb` or
        `memory.peak_mb`); None when no record has one (runs do not record it yet)."""
        peaks = []
        for rec in self.cases:
            for block, key in (("time", "peak_mem_mb"), ("memory", "peak_mb")):
                b = rec.get(block)
                if isinstance(b, dict) and finite_or_none(b.get(key)) is not None:
                    peaks.append(float(b[key]))
        return max(peaks) if peaks else None

    @property
    def checkpoints(self) -> list[dict]:
        """A sequential run's checkpoints (summary.json `sequential.checkpoints`): the scores
        after each number of edits."""
        seq = self.summary.get("sequential")
        cps = seq.get("checkpoints") if isinstance(seq, dict) else None
        return [c for c in cps if isinstance(c, dict) and isinstance(c.get("n_edits"), int)] \
            if isinstance(cps, list) else []


# Rebuilds the summary of a run stopped before it wrote summary.json (SIGKILL): (run directory,
# config.json, case records) -> summary. The report CLI passes bench.runner's summarize_run, a
# layer this package may not import.
SummaryRebuild = Callable[[Path, dict, list[dict]], dict]


def load_run(path: Path, rebuild_summary: SummaryRebuild | None = None) -> Run:
    """The run in directory `path`. Its cases come from RunDir.read_cases, which drops a torn last
    line (a killed run) without touching the file: the report never modifies a run directory.
    Without summary.json (a run killed before it wrote one), `rebuild_summary` makes it from
    config.json and the cases (the run is then marked incomplete when cases are missing);
    without `rebuild_summary` that is a BenchError saying how to go on."""
    run_dir = RunDir(Path(path))
    if not run_dir.path.is_dir():
        raise BenchError(f"{run_dir.path}: run directory not found")
    if not run_dir.config_path.is_file():
        raise BenchError(f"{run_dir.path}: no config.json (not a run directory?)")
    config = read_json(run_dir.config_path)
    if not isinstance(config, dict):
        raise BenchError(f"{run_dir.config_path}: expected a JSON object")
    rebuilt = not run_dir.summary_path.is_file()
    if rebuilt and rebuild_summary is None:
        raise BenchError(f"{run_dir.path}: no summary.json (the run was stopped before it wrote one): "
                         f"`bench report` rebuilds it from cases.jsonl, or finish the run with "
                         f"`bench run --resume {run_dir.path}`")
    summary = rebuild_summary(run_dir.path, config, run_dir.read_cases()) if rebuilt \
        else read_json(run_dir.summary_path)
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise BenchError(f"{run_dir.summary_path}: expected a JSON object with a 'tasks' object")
    for task, metrics in summary["tasks"].items():
        if not isinstance(metrics, dict):
            raise BenchError(f"{run_dir.summary_path}: tasks.{task} is not an object")
    return Run(run_dir.path, config, summary, run_dir.read_cases(), run_dir.cases_path.is_file(),
               summary_rebuilt=rebuilt)


def slugify(s: str) -> str:
    """`s` reduced to characters that are safe in a file name and an HTML anchor."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.") or "x"


def _stable_index(name: str, n: int) -> int:
    # Python's hash() is salted per process: a report must give a name the same slot every time.
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % n


def assign_style(runs: list[Run]) -> None:
    """Colour and marker per run, fixed by editor name: the first run (by directory name, those
    named after the editor first) of a known editor gets its editor's colour and marker, an
    unknown editor a free slot chosen from its name; a further run of the same editor the next
    free slot. No two runs share a colour and a marker."""
    used_c: set[str] = set()
    used_m: set[str] = set()
    used: set[tuple[str, str]] = set()
    later: list[Run] = []
    unknown: list[Run] = []
    seen: set[str] = set()
    # a directory named after its editor ("ft-<time>") before derived ones ("ablate-ft-...")
    for r in sorted(runs, key=lambda r: (r.editor, not r.name.startswith(r.editor), r.name)):
        if r.editor in seen:
            later.append(r)
            continue
        seen.add(r.editor)
        if r.editor not in EDITOR_COLORS:
            unknown.append(r)
            continue
        r.color, r.marker = EDITOR_COLORS[r.editor], EDITOR_MARKERS[r.editor]
        used_c.add(r.color)
        used_m.add(r.marker)
        used.add((r.color, r.marker))

    def free_look(name: str, first: bool) -> tuple[str, str]:
        # an unused colour and an unused marker while there are any; past six editors, a
        # colour-and-marker pair no run has yet
        free_c = [c for c in PALETTE if c not in used_c] or list(PALETTE)
        free_m = [m for m in MARKERS if m not in used_m] or list(MARKERS)
        pairs = [(c, m) for c in free_c for m in free_m if (c, m) not in used] or [(free_c[0], free_m[0])]
        look = pairs[_stable_index(name, len(pairs))] if first else pairs[0]
        used_c.add(look[0])
        used_m.add(look[1])
        used.add(look)
        return look

    for r in unknown:  # after the known editors, so a new editor never takes a known one's look
        r.color, r.marker = free_look(r.editor, first=True)
    for r in later:
        r.color, r.marker = free_look(r.editor, first=False)


def _hparams(run: Run) -> dict:
    ed = run.config.get("editor")
    hp = ed.get("hparams") if isinstance(ed, dict) else None
    return hp if isinstance(hp, dict) else {}


def _hparam_labels(editor: str, runs: list[Run]) -> dict[str, str]:
    """Run name -> "editor (key=value, ...)" naming the hyperparameters in which runs of one
    editor differ (FT-L and FT-M: "ft (objective=target_masked)"), when that tells every run
    apart; {} otherwise. A value most of the runs share is not repeated in their labels."""
    hps = [_hparams(r) for r in runs]
    keys = sorted({k for hp in hps for k in hp})
    differ = [k for k in keys if len({json.dumps(hp.get(k), sort_keys=True) for hp in hps}) > 1]
    if not differ:
        return {}
    common = {}
    for k in differ:  # a value most runs share is left out of the labels (a tie: none is)
        values = [json.dumps(hp.get(k), sort_keys=True) for hp in hps]
        counts = sorted((values.count(v) for v in set(values)), reverse=True)
        common[k] = max(set(values), key=values.count) if counts[0] > counts[1] else None
    labels = {}
    for r, hp in zip(runs, hps):
        parts = [f"{k}={_short(hp.get(k))}" for k in differ
                 if json.dumps(hp.get(k), sort_keys=True) != common[k]]
        labels[r.name] = f"{editor} ({', '.join(parts)})" if parts else editor
    return labels if len(set(labels.values())) == len(runs) else {}


def _short(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def assign_labels(runs: list[Run]) -> None:
    """Label = editor name; when an editor has several runs, add the run directory's name
    (without a leading '<editor>-') so the rows can be told apart. Also sets each run's slug
    (unique, case-insensitively), colour and marker."""
    # runs are told apart within what the report ranks together (model, metric definitions,
    # mode, prompt format): ft on two models is "ft" in each model's table
    by_editor: dict[tuple, list[Run]] = {}
    for r in runs:
        by_editor.setdefault((r.comparison_key, r.editor), []).append(r)
    for (_, editor), rs in by_editor.items():
        if len(rs) == 1:
            rs[0].label = editor
            continue
        by_hparams = _hparam_labels(editor, rs)
        for r in rs:
            suffix = r.name[len(editor) + 1:] if r.name.startswith(editor + "-") else r.name
            r.label = by_hparams.get(r.name) or f"{editor} ({suffix or r.name})"
    seen: dict[tuple, int] = {}
    for r in runs:  # identical directory names under different parents
        key = (r.comparison_key, r.label)
        if key in seen:
            seen[key] += 1
            r.label = f"{r.label} #{seen[key]}"
        else:
            seen[key] = 1
    slugs: set[str] = set()
    for r in runs:
        base = slugify(r.label)
        slug, k = base, 2
        while slug.lower() in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug.lower())
        r.slug = slug
    assign_style(runs)
