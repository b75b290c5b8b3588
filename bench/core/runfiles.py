"""Run directories: config.json, cases.jsonl (append-only, flushed per case), summary.json.

See docs/run-format.md for the exact layout. Writes are crash-safe: a case line is flushed and
fsync'ed as soon as the case finishes, JSON files are replaced atomically, and a torn last line
left by a kill is dropped on reading (that case is simply run again on resume). A process that
writes into a run directory holds its lock (`lock`), so two processes never run the same cases.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import types
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from bench.core.errors import BenchError
from bench.core.io import append_jsonl, read_json, read_jsonl, write_json_atomic, write_jsonl

if TYPE_CHECKING:  # only the sequential state holds tensors: reading reports needs no torch
    import torch

CONFIG = "config.json"
CASES = "cases.jsonl"
SUMMARY = "summary.json"
LOCK = "run.lock"
# Sequential runs (bench.sequential): their evaluations at checkpoints, and what a resume needs.
CHECKPOINTS = "checkpoints.jsonl"
SEQUENTIAL_DIR = "sequential"
PRE = "pre.jsonl"  # every case's pre-edit record, evaluated on the unedited model
PROBES = "locality_probes.json"  # the fixed locality probes and their pre-edit readings
STATE = "state.safetensors"  # the model's changed tensors and the editor's state at the last checkpoint
STATE_FORMAT = "sequential-state/v1"

# Run directories this process has locked, in order (bench.cli says after Ctrl-C which ones hold
# finished cases); see locked_runs().
_LOCKED: list[Path] = []

# A run name is one path component that a shell glob and a CSV cell take as plain text.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_run_name(name: str) -> str:
    """`name` if it is a safe directory name, else BenchError (no separators, no '..', no
    leading dot, dash or '=')."""
    if not _NAME.fullmatch(name) or len(name) > 200:
        raise BenchError(f"run name {name!r} must be one directory name of letters, digits and "
                         "'.', '_', '+', '-', starting with a letter or digit")
    return name


def new_run_dir(output_dir: Path, label: str) -> Path:
    """A fresh directory `<output_dir>/<label>-<UTC time>[-k]`."""
    check_run_name(label)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise BenchError(f"output directory {output_dir} is a file")
    base = output_dir / f"{label}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise BenchError(f"cannot create the run directory {path}: {exc.strerror or exc}") from None
    return path


def _is_a(value, hint) -> bool:
    """Whether a JSON value fits a RunOptions field's type (str, int, bool, X | None, list[X],
    dict)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        inner = (typing.get_args(hint) or (object,))[0]
        return isinstance(value, list) and all(_is_a(v, inner) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_stored_options(stored: dict, options_class, where: str) -> None:
    """A run's stored options (config.json `options`) checked like user input before they are
    used: each of the option class's (a dataclass) fields of its type, `hparams` a mapping of
    name: value, `task_options` a mapping of task: mapping. One BenchError naming the field."""
    hints = typing.get_type_hints(options_class)
    for key, value in stored.items():
        if key in hints and not _is_a(value, hints[key]):
            want = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key])
            raise BenchError(f"{where}: options.{key} is {type(value).__name__} {str(value)[:40]!r}, "
                             f"not {want.replace('typing.', '')}")
    if not all(isinstance(v, dict) for v in (stored.get("task_options") or {}).values()):
        raise BenchError(f"{where}: options.task_options must map each task to a mapping of options")


def check_run_config(config: dict, where: str) -> None:
    """What resuming a run reads from its config.json besides `options`, checked before use: the
    editor (`editor.name` the same as `options.editor`: records of two editors are never
    summarised together; `editor.hparams` a mapping) and the original command (`argv`)."""
    editor = config.get("editor")
    if not isinstance(editor, dict) or not isinstance(editor.get("name"), str) \
            or not isinstance(editor.get("hparams"), dict):
        raise BenchError(f"{where}: config.json lacks its editor (editor.name and editor.hparams)")
    options = config.get("options") if isinstance(config.get("options"), dict) else {}
    named = options.get("editor", "ft")  # RunOptions' default
    if editor["name"] != named:
        raise BenchError(f"{where}: config.json names two editors (editor.name {editor['name']!r}, "
                         f"options.editor {named!r}); its records belong to one: start a new run")
    argv = config.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise BenchError(f"{where}: config.json argv must be a list of strings")
    for key in ("command", "created"):
        if not isinstance(config.get(key, ""), str):
            raise BenchError(f"{where}: config.json {key} must be a string")


def check_resume_limit(run: "RunDir", limit) -> None:
    """`--limit` given with `--resume` extends the run, or narrows what is left to do, but never
    below the cases a task has already finished: config.json would plan fewer cases than the
    summary averages. `limit`: "keep" (not given), None (all cases) or a positive count."""
    if limit == "keep" or limit is None:
        return
    finished: dict[str, int] = {}
    for rec in run.read_cases():
        finished[str(rec["task"])] = finished.get(str(rec["task"]), 0) + 1
    task, most = max(finished.items(), key=lambda kv: kv[1], default=("", 0))
    if limit < most:
        raise BenchError(f"--limit {limit} is below the {most} cases {task} has already finished in "
                         f"{run.path}: a resumed run is extended, never narrowed below its finished "
                         f"cases (give --limit {most} or more, or start a new run)")


def locked_runs() -> list[Path]:
    """The run directories this process has locked so far (RunDir.lock), oldest first."""
    return list(_LOCKED)


def completeness(summary: dict) -> dict:
    """{"complete", "finished_cases", "planned_cases"} of a summary (summarize_run's): the case
    records of each planned task (`task_info.<task>.n_cases`) against the cases planned for it
    (`planned_cases`; a summary from before that field counts as complete). A sequential run is
    complete only once its last checkpoint (all planned edits) is evaluated."""
    info = summary.get("task_info")
    info = [i for i in info.values() if isinstance(i, dict)] if isinstance(info, dict) else []

    def count(x) -> int:
        return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else 0

    finished = [count(i.get("n_cases")) for i in info]
    planned = [count(i.get("planned_cases", i.get("n_cases"))) for i in info]
    complete = all(f >= p for f, p in zip(finished, planned))
    seq = summary.get("sequential")
    if isinstance(seq, dict) and count(seq.get("n_edits")) < count(seq.get("planned_edits")):
        complete = False
    return {"complete": complete, "finished_cases": sum(finished), "planned_cases": sum(planned)}


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._locks: list[int] = []

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def cases_path(self) -> Path:
        return self.path / CASES

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    def shard_path(self, rank: int) -> Path:
        return self.path / f"cases.rank{rank}.jsonl"

    # -- the lock ------------------------------------------------------------------------------

    def lock(self, rank: int | None = None) -> None:
        """Take this process's lock on the run: exclusive for a lone process; for process `rank`
        of a sharded run, shared on the run and exclusive on its shard. Held until release() or
        the process ends (the kernel drops flock locks of a dead process)."""
        if not self.path.is_dir():
            raise BenchError(f"run directory {self.path} does not exist")
        wanted = [(self.path / LOCK, fcntl.LOCK_EX if rank is None else fcntl.LOCK_SH)]
        if rank is not None:
            wanted.append((self.path / f"run.rank{rank}.lock", fcntl.LOCK_EX))
        for path, mode in wanted:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                raise BenchError(f"run directory {self.path} is in use by another bench process; "
                                 "wait for it to finish (or stop it) before resuming") from None
            self._locks.append(fd)
        _LOCKED.append(self.path)

    def release(self) -> None:
        for fd in self._locks:
            os.close(fd)  # closing the descriptor drops its flock
        self._locks = []

    # -- files ---------------------------------------------------------------------------------

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict:
        if not self.path.is_dir():
            raise BenchError(f"run directory {self.path} does not exist")
        config = read_json(self.config_path)
        if not isinstance(config, dict):
            raise BenchError(f"{self.config_path}: expected a JSON object")
        return config

    def read_cases(self, repair: bool = False) -> list[dict]:
        """Finished cases from cases.jsonl and any per-process shards (a sharded run that has not
        been merged yet), without duplicates (the first record of a (task, case_id) wins).
        `repair` cuts a torn last line off the files (only the process holding the lock may)."""
        records, seen = [], set()
        for path in [self.cases_path] + sorted(self.path.glob("cases.rank*.jsonl")):
            for rec in read_jsonl(path, repair=repair):
                if not isinstance(rec, dict) or "task" not in rec or "case_id" not in rec:
                    raise BenchError(f"{path}: a case record needs 'task' and 'case_id'")
                key = (rec["task"], rec["case_id"])
                if key not in seen:
                    seen.add(key)
                    records.append(rec)
        return records

    def append_case(self, record: dict, rank: int | None = None) -> None:
        """Append one finished case (to this process's shard when the run is sharded)."""
        append_jsonl(self.cases_path if rank is None else self.shard_path(rank), record)

    def merge_shards(self, order: list[tuple[str, str]]) -> list[dict]:
        """Fold shard files into cases.jsonl (in the run's planned case order) and remove them."""
        records = self.read_cases(repair=True)
        rank = {key: i for i, key in enumerate(order)}
        records.sort(key=lambda r: rank.get((r["task"], r["case_id"]), len(rank)))
        write_jsonl(self.cases_path, records)
        for shard in self.path.glob("cases.rank*.jsonl"):
            shard.unlink()
        return records

    def write_summary(self, summary: dict) -> None:
        """Write summary.json, stamped with whether the run is complete (`completeness`): a run
        stopped by Ctrl-C or SIGTERM writes its summary of the finished cases on the way out."""
        summary.update(completeness(summary))
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict:
        return read_json(self.summary_path)

    # -- sequential runs -----------------------------------------------------------------------

    @property
    def sequential_dir(self) -> Path:
        return self.path / SEQUENTIAL_DIR

    def read_checkpoints(self, repair: bool = False) -> list[dict]:
        return read_jsonl(self.path / CHECKPOINTS, repair=repair)

    def append_checkpoint(self, record: dict) -> None:
        append_jsonl(self.path / CHECKPOINTS, record)

    def write_cases(self, records: list[dict]) -> None:
        """Replace cases.jsonl (a sequential resume drops the records of edits the state lacks;
        the end of a sequential run adds every case's final scores)."""
        write_jsonl(self.cases_path, records)

    def read_pre(self, repair: bool = False) -> list[dict]:
        return read_jsonl(self.sequential_dir / PRE, repair=repair)

    def append_pre(self, record: dict) -> None:
        self.sequential_dir.mkdir(exist_ok=True)
        append_jsonl(self.sequential_dir / PRE, record)

    def read_probes(self) -> dict | None:
        path = self.sequential_dir / PROBES
        return read_json(path) if path.exists() else None

    def write_probes(self, probes: dict) -> None:
        self.sequential_dir.mkdir(exist_ok=True)
        write_json_atomic(self.sequential_dir / PROBES, probes)

    def write_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """The sequential state, replaced atomically: a kill leaves the previous one whole."""
        self.sequential_dir.mkdir(exist_ok=True)
        path = self.sequential_dir / STATE
        tmp = path.with_name(path.name + ".tmp")
        from safetensors.torch import save_file  # late: imports torch (report and list need none)

        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": STATE_FORMAT, "meta": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of the last checkpoint, or None before the first."""
        path = self.sequential_dir / STATE
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # a file that is not safetensors at all
            raise BenchError(f"{path}: unreadable sequential state ({exc})") from None
        if header.get("format") != STATE_FORMAT:
            raise BenchError(f"{path}: not a sequential state file ({STATE_FORMAT})")
        return tensors, json.loads(header["meta"])
