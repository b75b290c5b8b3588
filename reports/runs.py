"""Loading `bench run` directories (docs/run-format.md) for the report, and telling them apart:
each run gets a display label (the editor, and what sets the run apart from the editor's other
runs: FT-L / FT-M, hyperparameters, instruction mode, held-out tasks), a slug for file names and
anchors, and a look (reports.looks: colour from the editor, marker and line style from the
variant)."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.core.errors import BenchError
from bench.core.io import read_json
from bench.core.runfiles import RunDir, completeness
from reports.looks import (EDITOR_COLORS, EDITOR_FAMILIES, EDITOR_MARKERS, MARKERS, PALETTE,  # noqa: F401
                           REFERENCE_COLOR, REFERENCE_EDITOR, assign_style)

FT_NAMES = {"prompt_last": "FT-L", "target_masked": "FT-M"}  # FT's objectives, as the papers name them
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
    family: str = ""  # the editor whose colour family the run wears (reports.looks)
    variant: int = 0  # 0: the editor's first variant in the report
    color: str = PALETTE[0]
    marker: str = MARKERS[0]
    dash: str = ""  # line style (SVG stroke-dasharray); '' is solid

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
    def argv(self) -> list[str] | None:
        a = self.config.get("argv")
        return [str(x) for x in a] if isinstance(a, list) else None

    @property
    def command(self) -> str | None:
        """The command as recorded in config.json (absolute paths shortened)."""
        c = self.config.get("command")
        return scrub_paths(str(c)) if c is not None else None

    @property
    def git_commit(self) -> str | None:
        """The commit of the code that made the run, where config.json records one (`git_commit`,
        `git.commit` or `versions.git_commit`); None otherwise (runs do not record it yet)."""
        git = self.config.get("git") if isinstance(self.config.get("git"), dict) else {}
        versions = self.config.get("versions") if isinstance(self.config.get("versions"), dict) else {}
        for v in (self.config.get("git_commit"), git.get("commit"), versions.get("git_commit"), versions.get("git")):
            if isinstance(v, str) and v:
                return v
        return None

    @property
    def hparam_overrides(self) -> dict | None:
        """The hyperparameters the command set (--hparam / --hparams-file), from
        `config.options.hparams`. When config.json records the argv of a `bench run`, only the
        keys the command line names (every key with --hparams-file): runs made before the
        options kept only what was set recorded every resolved value there. None when the run
        did not record its options."""
        opts = self.config.get("options")
        if not isinstance(opts, dict):
            return None
        h = opts.get("hparams")
        h = dict(h) if isinstance(h, dict) else {}
        argv = self.argv
        if argv is None or "run" not in argv or any(a == "--hparams-file" or a.startswith("--hparams-file=")
                                                     for a in argv):
            return h
        named: list[str] = []
        for i, a in enumerate(argv):
            item = a[len("--hparam="):] if a.startswith("--hparam=") else \
                argv[i + 1] if a == "--hparam" and i + 1 < len(argv) else None
            if item is not None and "=" in item:
                named.append(item.partition("=")[0].strip())
        return {k: v for k, v in h.items() if k in named}

    @property
    def resolved_hparams(self) -> dict:
        ed = self.config.get("editor")
        hp = ed.get("hparams") if isinstance(ed, dict) else None
        return hp if isinstance(hp, dict) else {}

    @property
    def uses_instructions(self) -> bool:
        ed = self.config.get("editor")
        return bool(isinstance(ed, dict) and ed.get("uses_instructions"))

    @property
    def instruction_mode(self) -> str | None:
        """"seen" or "unseen" for an editor that reads instructions, else None."""
        m = self.config.get("instruction_mode")
        return str(m) if self.uses_instructions and m else None

    @property
    def held_out(self) -> list[str]:
        """The tasks flagged held out (--holdout), else those a learned editor did not train on."""
        flagged = [t for t in self.tasks if self.holdout(t)]
        if flagged or self.train_tasks is None:
            return flagged
        return [t for t in self.tasks if t not in self.train_tasks]

    @property
    def display_editor(self) -> str:
        """The editor's name as users know it: FT by its objective (FT-L: prompt_last, FT-M:
        target_masked) when the run records it; else the editor's name."""
        if self.editor == "ft":
            return FT_NAMES.get(str(self.resolved_hparams.get("objective")), "ft")
        return self.editor

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
        """The largest peak memory the run records: a case record's `time.peak_mem_mb` or
        `memory.peak_mb`, or summary.json's `peak_memory_mb` / `memory.peak_mb`; None when it
        records none (runs made before the runner measured it, 2026-12-07)."""
        peaks = []
        for rec in self.cases + [self.summary]:
            for block, key in (("time", "peak_mem_mb"), ("memory", "peak_mb"), (None, "peak_memory_mb")):
                b = rec if block is None else rec.get(block)
                if isinstance(b, dict) and finite_or_none(b.get(key)) is not None:
                    peaks.append(float(b[key]))
        return max(peaks) if peaks else None

    @property
    def training(self) -> dict | None:
        """A learned editor's training cost from its notes: {'seconds', 'steps'} (None where not
        recorded); None for an editor that does not train."""
        if self.train_tasks is None and not any(k in self.notes for k in ("train_time_s", "train_steps")):
            return None
        steps = self.notes.get("train_steps")
        return {"seconds": finite_or_none(self.notes.get("train_time_s")),
                "steps": steps if isinstance(steps, int) and not isinstance(steps, bool) else None}

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


from reports.labels import assign_labels, slugify, variant_labels  # noqa: E402,F401  (labelling: reports.labels)
