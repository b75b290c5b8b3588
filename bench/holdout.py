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
* matrix.json (beside the run directories) names the run directory of every (held-out task,
  editor, instruction mode); `bench report --matrix` renders it (reports.matrix).
* Columns: `columns` makes only some held-out tasks' runs, so that processes (or machines
  sharing the output directory) can make different columns at once; such a partial invocation
  writes no matrix.json (it would overwrite another one's), a later full one finds every run.
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
                            matrix_view, run_dirs)
from reports.runs import assign_labels, load_run
from tasks.registry import get_card

# EQUAL_STEPS (bench.core.defaults, where the command line reads it without loading torch): every
# editor trains exactly max_steps steps, no early stopping, no time budget (InstructEdit's longer
# prompts would otherwise stop it earlier than MEND). Overridable with --hparam.

# Options that do not change what a run computes (a run is reused whatever their values).
IGNORED_OPTIONS = ("output_dir", "retrain")
_STAMP = r"-\d{8}-\d{6}(-\d+)?"  # bench.core.runfiles.new_run_dir's suffix


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: `editor` trained without `holdout`, evaluated with the `instruction`
    description ("seen", "unseen"; NO_INSTRUCTION for an editor without instructions)."""

    holdout: str
    editor: str
    instruction: str

    @property
    def label(self) -> str:
        """The run directory's name before its time stamp."""
        mode = "" if self.instruction == NO_INSTRUCTION else f"-{self.instruction}"
        return f"{self.editor}{mode}-holdout-{self.holdout}"


@dataclass
class MatrixPlan:
    editors: list[str]
    tasks: list[str]
    output_dir: Path
    base: RunOptions  # model, data, limit, seed, protocols...: what every run shares
    hparams: dict  # the overrides every editor gets (EQUAL_STEPS under --hparam)
    columns: list[str] | None = None  # held-out tasks to make now (None: all of `tasks`)

    @property
    def partial(self) -> bool:
        return self.columns is not None and set(self.columns) != set(self.tasks)

    def cells(self) -> list[Cell]:
        out = []
        for task in self.tasks:
            if self.columns is not None and task not in self.columns:
                continue
            for editor in self.editors:
                modes = INSTRUCTION_MODES if get_editor_class(editor).uses_instructions else (NO_INSTRUCTION,)
                out += [Cell(task, editor, mode) for mode in modes]
        return out

    def options(self, cell: Cell) -> RunOptions:
        """The cell's run: every task evaluated, the cell's task held out of training."""
        mode = "seen" if cell.instruction == NO_INSTRUCTION else cell.instruction
        return dataclasses.replace(self.base, editor=cell.editor, tasks=list(self.tasks), holdout=[cell.holdout],
                                   instruction_mode=mode, hparams=dict(self.hparams), run_name=cell.label,
                                   output_dir=str(self.output_dir), retrain=False, mode="single")


def _names(kind: str, names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"--{kind} names {', '.join(dup)} twice")


def check_inputs(editors: list[str], tasks: list[str], columns: list[str] | None = None) -> None:
    """One-line errors for a matrix that cannot be made, before anything loads."""
    _names("editors", editors)
    _names("tasks", tasks)
    for name in columns or ():
        if name not in tasks:
            raise BenchError(f"--columns names {name!r}, which is not one of --tasks ({','.join(tasks)})")
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
    """The cell's run directory from an earlier invocation: named after the cell, with the same
    options (model, data, limit, seed, hyperparameters, ...). A complete one first, else the
    newest; None when there is none."""
    if not output_dir.is_dir():
        return None
    pattern = re.compile(re.escape(cell.label) + _STAMP)
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
    """Per held-out task: whether every editor trained on the same tasks, as many steps, with the
    same draws per task (the first run of each editor)."""
    out = {}
    for task, by_editor in doc["training"].items():
        facts = [(t["train_tasks"], t["steps"], t["sampled"]) for t in by_editor.values()]
        out[task] = all(f == facts[0] for f in facts)
    return out


def run_matrix(plan: MatrixPlan, argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Make (or complete) every run of the matrix and write matrix.json; returns its content."""
    check_inputs(plan.editors, plan.tasks, plan.columns)
    for cell in plan.cells():
        check_run_name(cell.label)
    plan.base.check()
    training_hparams = equal_training_hparams(plan)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    doc = {"format": MATRIX_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "bench " + " ".join(argv or []), "editors": list(plan.editors), "tasks": list(plan.tasks),
           "model": plan.base.model, "seed": plan.base.seed, "limit": plan.base.limit,
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
        doc["runs"].setdefault(cell.holdout, {}).setdefault(cell.editor, {})[cell.instruction] = Path(path).name
        doc["training"].setdefault(cell.holdout, {}).setdefault(cell.editor, _training(Path(path)))
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
                f"differ; see {MATRIX_FILE}, training)")
    return doc


def print_matrix(doc: dict, output_dir: Path, log: Callable[[str], None] = print) -> None:
    """The matrix as text tables, from the runs matrix.json names."""
    runs = [load_run(p) for p in run_dirs(doc, output_dir)]
    assign_labels(runs)  # as the report does: every run its own label and slug
    log(format_matrix(matrix_view(doc, output_dir, runs)))
    log(f"matrix: {output_dir / MATRIX_FILE}")
