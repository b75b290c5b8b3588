"""Leave-one-task-out evaluation (`bench holdout-matrix`, docs/holdout.md): for each task T of a
set, every learned editor trains on the other tasks and is evaluated on T held out and on the
tasks it trained on, each evaluation an ordinary run directory (bench.runner.execute).

* Equal training: the editors get the same hyperparameter overrides and seed, and their resolved
  training hyperparameters (steps, batch size and mixture, learning rates, network shape...)
  must be equal, or the matrix stops before anything runs; early stopping and the time budget
  are off unless overridden (EQUAL_STEPS), so every editor trains exactly `max_steps` steps. The
  training tasks are the run set-up's for `--holdout T` (every task with train data but T), the
  same for every editor.
* Reuse: a checkpoint is found in the editors' cache (never retrained); a run directory whose
  stored options equal the cell's is reused: skipped when complete, resumed when not.
* matrix.json (beside the run directories) names the run directory of every (held-out task or
  "none", editor, instruction mode, seed); `bench report --matrix` renders it (reports.matrix).
* Columns: `columns` makes only some held-out tasks' runs, so that processes (or machines
  sharing the output directory) can make different columns at once; such a partial invocation
  writes no matrix.json (it would overwrite another one's), a later full one finds every run.
* Multi-task (`multitask`): one more column, MULTITASK ("none" held out): every editor trained on
  every task with train data, evaluated in distribution on each of `tasks`.
* Seeds (`seeds`): every cell once per training seed (the run's seed, which is part of the
  checkpoint's cache key: one checkpoint per seed); run directories are named `...-seed<S>`, and
  a run of an earlier single-seed matrix (no suffix) with the same options is reused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bench import runner, session
from bench.core.defaults import EQUAL_STEPS
from bench.core.errors import BenchError
from bench.core.io import read_json, write_json_atomic
from bench.core.runfiles import CONFIG, SUMMARY, RunDir, check_run_name
from bench.session import RunOptions
from editors import get_editor_class
from reports.matrix import (MATRIX_FILE, MATRIX_FORMAT, NO_INSTRUCTION, INSTRUCTION_MODES, format_matrix,
                            matrix_view, read_matrix, run_dirs)
from reports.seeded import MULTITASK
from reports.runs import assign_labels, load_run
from tasks.registry import get_card

# EQUAL_STEPS (bench.core.defaults, where the command line reads it without loading torch): every
# editor trains exactly max_steps steps, no early stopping, no time budget (InstructEdit's longer
# prompts would otherwise stop it earlier than MEND). Overridable with --hparam.

# Options that do not change what a run computes (a run is reused whatever their values); the
# run name is matched by the directory's name (a seeded cell also takes an unseeded run).
IGNORED_OPTIONS = ("output_dir", "retrain", "run_name")
_STAMP = r"-\d{8}-\d{6}(-\d+)?"  # bench.core.runfiles.new_run_dir's suffix


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: `editor` trained without `holdout` (MULTITASK: on every task),
    evaluated with the `instruction` description ("seen", "unseen"; NO_INSTRUCTION for an editor
    without instructions); `seed`: the training seed of a matrix with --seeds (None: the run
    options' seed, and no seed in the name)."""

    holdout: str
    editor: str
    instruction: str
    seed: int | None = None

    @property
    def unseeded_label(self) -> str:
        mode = "" if self.instruction == NO_INSTRUCTION else f"-{self.instruction}"
        where = "multitask" if self.holdout == MULTITASK else f"holdout-{self.holdout}"
        return f"{self.editor}{mode}-{where}"

    @property
    def label(self) -> str:
        """The run directory's name before its time stamp."""
        return self.unseeded_label + ("" if self.seed is None else f"-seed{self.seed}")

    @property
    def labels(self) -> tuple[str, ...]:
        """The names a run of this cell may have: its label, and for a seeded cell the unseeded
        one (a run of a single-seed matrix; its stored seed must be the cell's)."""
        return (self.label,) if self.seed is None else (self.label, self.unseeded_label)


@dataclass
class MatrixPlan:
    editors: list[str]
    tasks: list[str]
    output_dir: Path
    base: RunOptions  # model, data, limit, seed, protocols...: what every run shares
    hparams: dict  # the overrides every editor gets (EQUAL_STEPS under --hparam)
    columns: list[str] | None = None  # held-out tasks (or MULTITASK) to make now (None: all)
    multitask: bool = False  # a column with no task held out
    seeds: list[int] | None = None  # training seeds (None: base.seed, run names without a seed)

    @property
    def all_columns(self) -> list[str]:
        """The matrix's columns: each held-out task, then MULTITASK with --multitask."""
        return list(self.tasks) + ([MULTITASK] if self.multitask else [])

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.base.seed]

    @property
    def partial(self) -> bool:
        return self.columns is not None and set(self.columns) != set(self.all_columns)

    def cells(self) -> list[Cell]:
        """Seed by seed (a killed matrix has finished whole seeds first), column by column."""
        out = []
        for seed in (self.seeds or [None]):
            for column in self.all_columns:
                if self.columns is not None and column not in self.columns:
                    continue
                for editor in self.editors:
                    modes = INSTRUCTION_MODES if get_editor_class(editor).uses_instructions else (NO_INSTRUCTION,)
                    out += [Cell(column, editor, mode, seed) for mode in modes]
        return out

    def options(self, cell: Cell) -> RunOptions:
        """The cell's run: every task evaluated, the cell's task held out of training (none for
        the multi-task column), the cell's seed."""
        mode = "seen" if cell.instruction == NO_INSTRUCTION else cell.instruction
        holdout = [] if cell.holdout == MULTITASK else [cell.holdout]
        seed = self.base.seed if cell.seed is None else cell.seed
        return dataclasses.replace(self.base, editor=cell.editor, tasks=list(self.tasks), holdout=holdout,
                                   seed=seed, instruction_mode=mode, hparams=dict(self.hparams),
                                   run_name=cell.label, output_dir=str(self.output_dir), retrain=False,
                                   mode="single")


def _names(kind: str, names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"--{kind} names {', '.join(dup)} twice")


def check_inputs(editors: list[str], tasks: list[str], columns: list[str] | None = None,
                 multitask: bool = False, seeds: list[int] | None = None) -> None:
    """One-line errors for a matrix that cannot be made, before anything loads."""
    _names("editors", editors)
    _names("tasks", tasks)
    if seeds is not None:
        _names("seeds", [str(s) for s in seeds])
        if not seeds:
            raise BenchError("--seeds needs at least one seed")
    for name in columns or ():
        if name == MULTITASK and not multitask:
            raise BenchError(f"--columns names {MULTITASK!r} (the multi-task column), which needs --multitask")
        if name not in tasks and name != MULTITASK:
            raise BenchError(f"--columns names {name!r}, which is not one of --tasks ({','.join(tasks)})"
                             + (f" or {MULTITASK}" if multitask else ""))
    for name in editors:
        if not get_editor_class(name).learns:  # an unknown name is an error here too
            raise BenchError(f"editor {name!r} does not learn: the matrix trains editors on all tasks "
                             "but one (mend, instructedit)")
    if len(editors) < 2:
        raise BenchError("--editors needs at least two learned editors to compare (e.g. instructedit,mend)")
    for name in tasks:
        card = get_card(name)  # unknown task
        if card.rule("train", False, False) is None and card.rule("train", False, True) is None:
            raise BenchError(f"task {name!r} has no train split: each task of the matrix is trained on "
                             "while another one is held out")
    if len(tasks) < 2:
        raise BenchError("--tasks needs at least two tasks: each is held out in turn while the editors "
                         "train on the others")


def equal_training_hparams(plan: MatrixPlan) -> dict:
    """The editors' resolved training hyperparameters for the model (defaults, the model's
    preset, the overrides): equal for all of them, else a BenchError naming what differs."""
    config = session.load_config(plan.base.model)
    resolved = {}
    for name in plan.editors:
        editor = session.build_editor(name, plan.hparams, config, plan.base.model)
        # training_hparams leaves out what does not change training (an explicit checkpoint path)
        hp = editor.training_hparams() if hasattr(editor, "training_hparams") else \
            dataclasses.asdict(editor.hparams)
        resolved[name] = json.loads(json.dumps(hp, sort_keys=True, default=str))
    first, ref = plan.editors[0], resolved[plan.editors[0]]
    for name in plan.editors[1:]:
        other = resolved[name]
        diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
        if diff:
            shown = ", ".join(f"{k} {ref.get(k)!r} vs {other.get(k)!r}" for k in diff)
            raise BenchError(f"the editors would not train alike ({first} vs {name}: {shown}); "
                             f"set these with --hparam so that they are equal")
    return ref


# --------------------------------------------------------------------------------------------
# Finding runs again
# --------------------------------------------------------------------------------------------


def _comparable(options: dict) -> dict:
    """Stored run options as compared between invocations (JSON types, the ignored ones out)."""
    plain = json.loads(json.dumps(options, sort_keys=True, default=str))
    return {k: v for k, v in plain.items() if k not in IGNORED_OPTIONS}


def run_complete(path: Path) -> bool:
    """Its summary is written and cases.jsonl holds every planned case of every task (counted
    from the case records: a killed run writes a summary on the way out)."""
    try:
        config = read_json(path / CONFIG)
        records = RunDir(path).read_cases() if (path / SUMMARY).is_file() else None
    except BenchError:
        return False
    tasks = config.get("tasks") if isinstance(config, dict) else None
    if records is None or not isinstance(tasks, list) or not tasks:
        return False
    done: dict[str, int] = {}
    for rec in records:
        done[str(rec["task"])] = done.get(str(rec["task"]), 0) + 1
    return all(isinstance(t, dict) and done.get(str(t.get("name")), 0) >= int(t.get("n_cases") or 0)
               for t in tasks)


def find_run(output_dir: Path, cell: Cell, opts: RunOptions) -> Path | None:
    """The cell's run directory from an earlier invocation: named after the cell (a seeded cell:
    or unseeded, from a single-seed matrix), with the same options (model, data, limit, seed,
    hyperparameters, ...). A complete one first, else the newest; None when there is none."""
    if not output_dir.is_dir():
        return None
    pattern = re.compile("(?:" + "|".join(re.escape(lab) for lab in cell.labels) + ")" + _STAMP)
    want = _comparable(dataclasses.asdict(opts))
    found = []
    for path in sorted(output_dir.iterdir()):
        if not (path.is_dir() and pattern.fullmatch(path.name) and (path / CONFIG).is_file()):
            continue
        try:
            stored = read_json(path / CONFIG).get("options")
        except (BenchError, AttributeError):
            continue
        if isinstance(stored, dict) and _comparable(stored) == want:
            found.append(path)
    complete = [p for p in found if run_complete(p)]
    return (complete or found or [None])[-1]


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


def _training(path: Path) -> dict:
    """What a run's editor trained on, as its config.json notes record it (no absolute paths)."""
    notes = read_json(path / CONFIG).get("notes") or {}
    ckpt = notes.get("checkpoint")
    return {"train_tasks": notes.get("train_tasks"), "steps": notes.get("train_steps"),
            "train_time_s": notes.get("train_time_s"),
            "sampled": {t: c.get("sampled") for t, c in (notes.get("per_task") or {}).items()
                        if isinstance(c, dict)},
            "checkpoint": Path(ckpt).name if ckpt else None, "checkpoint_source": notes.get("checkpoint_source")}


def _same_training(doc: dict) -> dict[str, bool]:
    """Per column (held-out task or MULTITASK): whether, for every seed, every editor trained on
    the same tasks, as many steps, with the same draws per task (the first run of each editor)."""
    out = {}
    for column, by_editor in doc["training"].items():
        seeds = sorted({s for by_seed in by_editor.values() for s in by_seed}, key=int)
        same = True
        for seed in seeds:
            facts = [(t["train_tasks"], t["steps"], t["sampled"]) for t in
                     (by_seed.get(seed) for by_seed in by_editor.values())
                     if t is not None]
            same = same and len(facts) == len(by_editor) and all(f == facts[0] for f in facts)
        out[column] = same
    return out


def run_matrix(plan: MatrixPlan, argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Make (or complete) every run of the matrix and write matrix.json; returns its content."""
    check_inputs(plan.editors, plan.tasks, plan.columns, plan.multitask, plan.seeds)
    for cell in plan.cells():
        check_run_name(cell.label)
    plan.base.check()
    training_hparams = equal_training_hparams(plan)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    doc = {"format": MATRIX_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "bench " + " ".join(argv or []), "editors": list(plan.editors), "tasks": list(plan.tasks),
           "model": plan.base.model, "seed": plan.seed_list[0], "seeds": plan.seed_list,
           "multitask": plan.multitask, "columns": plan.all_columns, "limit": plan.base.limit,
           "hparams": dict(plan.hparams), "training_hparams": training_hparams,
           "runs": {}, "training": {}}
    matrix_path = plan.output_dir / MATRIX_FILE
    cells = plan.cells()
    for i, cell in enumerate(cells, 1):
        opts = plan.options(cell)
        found = find_run(plan.output_dir, cell, opts)
        where = f"[{i}/{len(cells)}] {cell.label}"
        if found is not None and run_complete(found):
            log(f"{where}: complete, kept: {found.name}")
            path = found
        elif found is not None:
            log(f"{where}: resuming {found.name}")
            path = runner.resume(found, log=log)
        else:
            log(f"{where}: new run (held out: {cell.holdout})")
            path = runner.execute(opts, argv=argv, log=log)
        seed = str(opts.seed)
        doc["runs"].setdefault(cell.holdout, {}).setdefault(cell.editor, {}).setdefault(
            cell.instruction, {})[seed] = Path(path).name
        doc["training"].setdefault(cell.holdout, {}).setdefault(cell.editor, {}).setdefault(
            seed, _training(Path(path)))
        if not plan.partial:
            write_json_atomic(matrix_path, doc)  # progress is visible, and a partial matrix reportable
    doc["same_training"] = _same_training(doc)
    if plan.partial:
        log(f"columns {','.join(plan.columns)} made; {MATRIX_FILE} not written: run the command again "
            f"without --columns once every column is made")
    else:
        write_json_atomic(matrix_path, doc)
    for task, same in doc["same_training"].items():
        if not same:
            log(f"warning: with {task} held out the editors did not train alike (tasks, steps or draws "
                f"differ, or a seed lacks an editor's run; see {MATRIX_FILE}, training)")
    return doc


def print_matrix(doc: dict, output_dir: Path, log: Callable[[str], None] = print) -> None:
    """The matrix as text tables, from the runs matrix.json names (a document as run_matrix
    returns it, or a v1 one as an older version wrote it)."""
    doc = read_matrix(output_dir / MATRIX_FILE) if doc.get("format") != MATRIX_FORMAT else doc
    runs = [load_run(p) for p in run_dirs(doc, output_dir)]
    assign_labels(runs)  # as the report does: every run its own label and slug
    log(format_matrix(matrix_view(doc, output_dir, runs)))
    log(f"matrix: {output_dir / MATRIX_FILE}")
