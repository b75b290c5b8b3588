"""What the benchmark scripts share: the data directory, cases from the task registry, torch
threads, machine facts, peak-memory measurement, preparing an editor as a run does, and one-line
errors.

The scripts run as `python benchmarks/<script>.py` from the repository root, so this module is
imported as a sibling (`import _common`); the harness itself comes from the installed package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

from bench.core.cases import EditCase
from bench.core.defaults import DEFAULT_MODEL
from bench.core.distributed import Shard
from bench.core.errors import BenchError
from bench.core.models import LoadedModel
from bench.session import RunOptions, edit_context, prepare_editor
from editors.base import EditContext, Editor
from tasks.registry import get_card, load_split, resolve_data_dir

try:  # optional: without it PeakRSS falls back to getrusage (a lower bound)
    import psutil
except ImportError:  # pragma: no cover - psutil is installed with the dev tools
    psutil = None


def log(msg: str) -> None:
    """Progress goes to stderr; stdout keeps the tables."""
    print(msg, file=sys.stderr, flush=True)


def run_main(main: Callable[[], None]) -> None:
    """Call `main`; a BenchError (bad option, missing data, bad hyperparameter) is one line on
    stderr and exit status 2, as for `bench`."""
    try:
        main()
    except BenchError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------
# Data and cases
# ------------------------------------------------------------------------------------------


def add_data_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-dir", default=None,
                    help="data directory (default: as bench finds it: $BENCH_DATA, then "
                         "../shared/data, else the built-in sample)")


def add_variant_run_arguments(ap: argparse.ArgumentParser, editor_help: str, hparam_scope: str,
                              edit_batch_help: str) -> None:
    """The options the variant benchmarks (sweep.py, kl_position.py) share: the editor, its
    hyperparameters for every variant, the train cases, the model and the run's settings."""
    ap.add_argument("--editor", default="rome", help=editor_help)
    ap.add_argument("--task", default="counterfact", help="task whose train split is used")
    ap.add_argument("--hparams-file", default=None, metavar="FILE|PRESET",
                    help=f"YAML mapping or the name of a preset shipped for the editor; for {hparam_scope}")
    ap.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override for {hparam_scope} (repeatable)")
    ap.add_argument("--cases", type=int, default=20, help="N cases of the task's train split (default 20)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many train cases first")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model spec or checkpoint directory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's choice)")
    ap.add_argument("--edit-batch", type=int, default=0, metavar="B", help=edit_batch_help)
    ap.add_argument("--json", default=None, help="write the rows and per-case records here")
    add_data_argument(ap)


def find_data_dir(arg: str | None) -> Path | None:
    """The harness's own resolution (tasks.registry.resolve_data_dir), announced on stdout so the
    printed tables say which data they measured; None: the cached published copies, else the
    built-in sample."""
    data_dir, builtin = resolve_data_dir(arg)
    print(f"data: {data_dir}" if not builtin else
          "data: no --data-dir, $BENCH_DATA or ../shared/data: each task's cached published copy, "
          "else the built-in sample records (numbers are not comparable; bench data list)")
    return data_dir


def load_cases(task: str, split: str, data_dir: Path | None, n: int, offset: int = 0) -> list[EditCase]:
    """Cases [offset, offset + n) of a task split; an empty selection is an error."""
    cases = load_split(task, split, data_dir).cases[offset: offset + n]
    if not cases:
        raise BenchError(f"task {task!r} has no {split} cases from {offset} on")
    if len(cases) < n:
        log(f"note: {task} {split} split has only {len(cases)} cases from {offset} on")
    return cases


def is_counterfact(task: str) -> bool:
    """Whether the task is scored with CounterFact's probability comparisons."""
    return "counterfact" in get_card(task).metrics


# ------------------------------------------------------------------------------------------
# Editors
# ------------------------------------------------------------------------------------------


def prepare(editor: Editor, lm: LoadedModel, data_dir: Path | None, holdout: list[str] | None = None,
            seed: int = 0, cache: Path | None = None) -> tuple[EditContext, float]:
    """Prepare `editor` as a run does (bench.session.edit_context and prepare_editor: the cache,
    training data for learned editors, the instruction wrapper); `cache` replaces the cache
    directory (a throwaway one for a random model). Returns (context, seconds in prepare)."""
    opts = RunOptions(editor=editor.name, holdout=list(holdout or []), seed=seed,
                      data_dir=str(data_dir) if data_dir else None)
    ctx = edit_context(opts, editor, data_dir, Shard(), log)
    if cache is not None:
        ctx = dataclasses.replace(ctx, cache_dir=cache)
    t0 = time.perf_counter()
    prepare_editor(editor, lm, ctx)
    return ctx, time.perf_counter() - t0


def scalar_notes(notes: dict, prefix: str = "") -> dict:
    """The scalar facts of ctx.notes, flattened (lists such as context templates left out)."""
    out = {}
    for key, value in notes.items():
        if isinstance(value, dict):
            out.update(scalar_notes(value, f"{prefix}{key}."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[prefix + key] = value
    return out


# ------------------------------------------------------------------------------------------
# Threads and machine
# ------------------------------------------------------------------------------------------


def set_threads(n: int) -> None:
    """torch intra-op threads (0: leave torch's choice) and one inter-op thread: on a shared
    machine fewer threads are faster and steadier."""
    if n < 0:
        raise BenchError("--threads must be 0 (torch's choice) or more")
    if n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load": loadavg()}


def machine_line(m: dict) -> str:
    return (f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} "
            f"thread(s), transformers {m['transformers']}, python {m['python']}")


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------


def max_rss_mib() -> float:
    """The process's resident-set high-water mark so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Peak resident-set growth while the block runs: psutil sampled every `interval` seconds
    on a background thread; without psutil, the growth of ru_maxrss (which only sees growth
    beyond the process's earlier peak, so it is a lower bound)."""

    source = "psutil" if psutil is not None else "ru_maxrss"

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.delta_mib = 0.0

    def __enter__(self) -> "PeakRSS":
        self._stop = threading.Event()
        if psutil is not None:
            proc = psutil.Process()
            self._base = self._peak = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if psutil is not None:
            self._thread.join()
            self._peak = max(self._peak, psutil.Process().memory_info().rss)
        else:
            self._peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.delta_mib = (self._peak - self._base) / 2**20
        return False


# ------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def fmt(x, nd: int = 2) -> str:
    """A number for a Markdown cell; "-" for None or NaN."""
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}"


def emit(table_text: str, info: dict, json_path: str | None) -> None:
    """Print a benchmark's table after a blank line; write all its measurements as JSON if asked."""
    print()
    print(table_text)
    if json_path:
        Path(json_path).write_text(json.dumps(info, indent=1, default=str))
