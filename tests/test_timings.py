"""One estimate for a command that trains before it evaluates (bench.core.timings): runs keep
their seconds per case in the cache, and a learned editor's training line adds the cases that
follow at that rate."""

from __future__ import annotations

import json

import editors.mend.trainer
from bench.core import timings
from bench.core.io import cache_dir
from bench.core.timings import WorkAfter
from bench.runner import execute
from bench.session import RunOptions
from tests.test_runner import FIXTURE_DATA

MEND = {"rank": 8, "max_steps": 2, "batch_size": 2, "val_cases": 0, "time_budget_s": 0}


def test_kept_per_key_and_unreadable_files_give_no_estimate(tmp_path):
    key = timings.timing_key("m@x:float32", "ft", ["zsre", "counterfact"], ["wild", "teacher_forced"], "single", "cpu")
    assert key == timings.timing_key("m@x:float32", "ft", ["counterfact", "zsre"], ["teacher_forced", "wild"],
                                     "single", "cpu")  # order of tasks and protocols does not matter
    assert timings.recorded(tmp_path, key) is None
    timings.record(tmp_path, key, 2.5)
    timings.record(tmp_path, "other", 9.0)
    assert timings.recorded(tmp_path, key) == 2.5 and timings.recorded(tmp_path, "other") == 9.0
    (tmp_path / timings.FILE).write_text("{not json")
    assert timings.recorded(tmp_path, key) is None
    timings.record(tmp_path, key, 3.0)  # a broken file is replaced, not a failure
    assert json.loads((tmp_path / timings.FILE).read_text()) == {key: 3.0}


def test_the_note_adds_the_cases_that_follow():
    assert WorkAfter(cases=300, s_per_case=2.0).note(60.0) == \
        "whole command ~11:00 left (then 300 cases at 2 s/case, as last measured here)"
    assert WorkAfter(cases=300, s_per_case=20.0).note(0.0).startswith("whole command ~1:40:00 left")
    assert WorkAfter(cases=300).note(60.0) == "then 300 cases (no timing of such a run here yet)"
    assert WorkAfter(cases=0, s_per_case=1.0).note(5.0) == ""


def test_a_training_run_estimates_the_whole_command_from_the_last_such_run(tmp_path, tiny_load, monkeypatch):
    lines = []

    class RecordingBar(editors.mend.trainer.tqdm):
        def set_postfix_str(self, s="", refresh=True):
            lines.append(s)
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(editors.mend.trainer, "tqdm", RecordingBar)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))  # no timing of other tests' runs
    opts = dict(editor="mend", tasks=["counterfact"], model="tiny", device="cpu", data_dir=str(FIXTURE_DATA),
                output_dir=str(tmp_path / "runs"), hparams=MEND, holdout=["counterfact"], retrain=True,
                protocols=("teacher_forced",))
    execute(RunOptions(**opts), log=lambda s: None)
    assert lines and all(line.endswith("; then 6 cases (no timing of such a run here yet)") for line in lines)
    table = json.loads((cache_dir() / timings.FILE).read_text())
    (key, s_per_case), = table.items()  # the run kept its seconds per case
    assert json.loads(key)[1:] == ["mend", ["counterfact"], ["teacher_forced"], "single", "cpu"] and s_per_case > 0
    lines.clear()
    execute(RunOptions(**opts), log=lambda s: None)  # the same run again: now it has a timing
    assert lines and all("; whole command ~" in line and "then 6 cases at" in line for line in lines)
